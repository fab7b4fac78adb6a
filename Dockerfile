# The bizcenter image: `docker run <image> worker`, `docker run <image> account-center`.
# Used by docker-compose.yml; the local development path (make up) needs no Docker.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs (the repository also holds .venv and .local).
COPY pyproject.toml constraints.txt README.md ./
COPY app ./app
COPY agents ./agents
COPY cli ./cli
COPY reference ./reference
COPY events ./events
COPY schemas ./schemas
RUN pip install -c constraints.txt . \
    && useradd --create-home --uid 10001 bizcenter

# Faust's data directory, BIZ_DATA_DIR (.local/worker-data/<app id>), is relative to this
# working directory (a volume in docker-compose.yml); the worker keeps no table there.
USER bizcenter
WORKDIR /home/bizcenter
ENTRYPOINT ["bizcenter"]
