"""edgeorch: run one large foundation model split by layers across edge nodes."""

__version__ = "0.1.0"
