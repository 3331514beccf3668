# The spinyard image: the gateway, every handler and the CLI, chosen by the
# command (`spinyard gateway`, `spinyard handlers page_load`, ...).
# Runs as an unprivileged user with a read-only root file system; the
# Kubernetes manifests mount an emptyDir at /tmp.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp

# The same uid/gid as runAsUser/runAsGroup in k8s/.
RUN groupadd --system --gid 10001 spinyard \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin spinyard

# Only what the package needs: see .dockerignore. No dev extras.
WORKDIR /src
COPY . .
RUN pip install . \
 && cd / && rm -rf /src

WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["spinyard"]
CMD ["--help"]
