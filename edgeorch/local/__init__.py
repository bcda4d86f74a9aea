"""Local launch tools: processes on loopback (or network namespaces), scenario files, `edgeorch up` and `edgeorch chain`."""
