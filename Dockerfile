# quotagate sidecar image. Production: point QUOTAGATE_REDIS_URL at Redis (AOF on).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .
# the data dir belongs to the user quotagate runs as: the embedded Redis's AOF and the
# SQLite file go there (a new named volume takes this ownership)
RUN mkdir -p /data && chown nobody:nogroup /data
ENV QUOTAGATE_LISTEN=127.0.0.1:50051 QUOTAGATE_DATA_DIR=/data
VOLUME /data
EXPOSE 50051
USER nobody
HEALTHCHECK --interval=10s --timeout=3s CMD ["quotagate", "health"]
ENTRYPOINT ["quotagate", "serve"]
