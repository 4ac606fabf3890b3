# petit server (and client) image. Installs into a venv and runs as a non-root user. It has
# the redis extra (redis-py), so [server.registry] backend = "redis" and cluster mode work.
#
# The image installs exactly what requirements.lock pins (versions and sha256 hashes), from a
# wheelhouse made beforehand; nothing is resolved or downloaded during the build:
#   python3 scripts/locked.py wheelhouse redis wheelhouse .venv/bin/python && podman build -t petit .
FROM python:3.11-slim

ENV PATH=/opt/petit/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY wheelhouse /tmp/wheelhouse
RUN python3 -m venv /opt/petit \
 && /opt/petit/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
      --find-links /tmp/wheelhouse --require-hashes --no-deps -r /tmp/wheelhouse/requirements.txt \
 && /opt/petit/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --no-deps \
      /tmp/wheelhouse/petit-*.whl \
 && rm -rf /tmp/wheelhouse \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/petit --create-home petit

COPY deploy/server-entrypoint.sh deploy/client-entrypoint.sh /opt/petit/bin/
COPY demo/backend.py /opt/petit/demo/backend.py

USER petit
WORKDIR /var/lib/petit
# tunnel endpoint, HTTP ingress, HTTPS ingress, control port, admin API
EXPOSE 3014 8090 8453 3016 8100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s \
  CMD ["/opt/petit/bin/petit-server", "status", "-c", "/var/lib/petit/config.toml"]
ENTRYPOINT ["/opt/petit/bin/server-entrypoint.sh"]
