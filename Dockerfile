# kubetune operator image: the Kopf operator only (no torch), small and non-root.
#   make images      (or: docker build -t ghcr.io/kubetune/operator:0.1.0 .)
# BASE: any image with python3 >= 3.11 and its venv module. The public default is a tag; pin it
# by digest for reproducible builds: --build-arg BASE=python:3.11-slim-bookworm@sha256:...
# (docs/images.md). The tests build FROM a local Debian bookworm base (make images BASE=local).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE} AS build
RUN python3 -m venv /opt/kubetune
WORKDIR /src
# Exact versions and hashes from requirements/operator.txt (make lock), the set the tests ran;
# installed before the code is copied, so a code change reuses this layer. pip's cache is a
# build cache mount: kept between builds, never in the image.
COPY requirements/operator.txt requirements/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/kubetune/bin/pip install --require-hashes -r requirements/operator.txt
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer_image/kubetune_trainer/ trainer_image/kubetune_trainer/
RUN /opt/kubetune/bin/pip install --no-cache-dir --no-deps .

FROM ${BASE}
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="Kubernetes operator for FineTuneJob (kubetune.dev)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/kubetune /opt/kubetune
ENV PATH=/opt/kubetune/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed non-root UID so runAsNonRoot can be verified by the kubelet.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["kubetune-operator"]
