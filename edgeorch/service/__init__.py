"""What every service shares: settings, access control, the Redis bus, SQL storage, the FastAPI base app, serving, Celery jobs."""
