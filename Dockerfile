# Production image: slim, non-root, gunicorn via `cds-service serve`.
# The demo site's Epic-compatibility defaults apply; mount a real site_config/ at /app/site_config
# and set CDS_DATABASE_URL to PostgreSQL for several replicas.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cds_service ./cds_service
COPY hooks ./hooks
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CDS_SITE_CONFIG=/app/site_config \
    CDS_MODELS_DIR=/app/models \
    CDS_DATABASE_URL=sqlite:////app/var/cds-service.sqlite3 \
    CDS_SANDBOX_BUNDLES_DIR=/app/examples/bundles
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin cds
COPY --from=build /install /usr/local
WORKDIR /app
COPY --chown=cds:cds site_config ./site_config
COPY --chown=cds:cds models ./models
# Synthetic patients for /sandbox (on only for a site with `sandbox: true` and a development key).
COPY --chown=cds:cds examples/bundles ./examples/bundles
RUN mkdir -p /app/var && chown cds:cds /app/var
USER cds
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
CMD ["cds-service", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
