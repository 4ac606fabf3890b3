# petit server (and client) image. Installs into a venv and runs as a non-root user. It has
# the redis extra (redis-py), so [server.registry] backend = "redis" and cluster mode work.
#
# Air-gapped build (default): the wheels come from ./wheelhouse, nothing is downloaded.
#   pip wheel '.[redis]' setuptools -w wheelhouse && docker build -t petit .
# Online build: let pip fetch the dependencies from the package index (an empty
# ./wheelhouse directory must exist: mkdir -p wheelhouse).
#   docker build --build-arg PIP_ARGS="" -t petit .
FROM python:3.11-slim

ARG PIP_ARGS="--no-index --find-links /tmp/wheelhouse"
ENV PATH=/opt/petit/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY wheelhouse /tmp/wheelhouse
COPY pyproject.toml README.md /tmp/src/
COPY petit /tmp/src/petit
COPY petit_client /tmp/src/petit_client
COPY petit_server /tmp/src/petit_server
RUN python3 -m venv /opt/petit \
 && /opt/petit/bin/pip install --no-cache-dir --disable-pip-version-check $PIP_ARGS '/tmp/src[redis]' \
 && rm -rf /tmp/wheelhouse /tmp/src \
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
