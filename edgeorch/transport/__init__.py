"""The data plane's transport: tensor frames, the hop HTTP client, the chain protocol and its sync client."""
