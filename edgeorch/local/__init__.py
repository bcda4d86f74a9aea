"""Launch tools: processes on loopback (or network namespaces), scenario files, `edgeorch up`, `edgeorch chain`, and the one-shot deploy step a container stack runs."""
