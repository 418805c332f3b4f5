# Production image: slim, non-root, gunicorn via `cds-service serve`.
# No site configuration is baked in: mount the hospital's at /etc/cds/site_config (without it the
# container exits 2 saying so), set CDS_PUBLIC_URL to the URL Epic calls, and CDS_DATABASE_URL to
# PostgreSQL for several replicas (docs/deploy.md):
#   docker run -v "$PWD/site_config:/etc/cds/site_config:ro" \
#     -e CDS_PUBLIC_URL=https://cds.example.org -p 8000:8000 cds-service:0.1.0
# Development keys and the sandbox are off (CDS_ALLOW_DEV_KEYS=false): a site file asking for a
# `dev_keypair` stops start-up. Only a development container turns them on, explicitly.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cds_service ./cds_service
COPY hooks ./hooks
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CDS_SITE_CONFIG=/etc/cds/site_config \
    CDS_ALLOW_DEV_KEYS=false \
    CDS_MODELS_DIR=/app/models \
    CDS_DATABASE_URL=sqlite:////app/var/cds-service.sqlite3 \
    CDS_SANDBOX_BUNDLES_DIR=/app/examples/bundles
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin cds
COPY --from=build /install /usr/local
WORKDIR /app
COPY --chown=cds:cds models ./models
# Synthetic patients for /sandbox (on only with CDS_ALLOW_DEV_KEYS=true and a site with
# `sandbox: true` and a development key).
COPY --chown=cds:cds examples/bundles ./examples/bundles
RUN mkdir -p /app/var && chown cds:cds /app/var
USER cds
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
CMD ["cds-service", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
