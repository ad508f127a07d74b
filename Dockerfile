# Container image for DPN on Ray: Ray 2.60 + Python 3.11 + CUDA, with this project installed.
# Used by the KubeRay manifests in deploy/k8s/ (head, workers, job drivers) and optionally by
# cluster.yaml (`docker.image`).
#
#   docker build -t registry.example.com/dpn-on-ray:0.1.0 .
#   docker push registry.example.com/dpn-on-ray:0.1.0
#
# The Ray version of the base image must match the Ray that submits jobs (the project's
# `ray` dependency); build a CPU-only image with --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Jobs are started from here: `python -m jobs.train --config configs/train_llava7b.yaml` reads
# configs/ relative to this directory (the manifests also set it as the containers' workingDir).
WORKDIR /home/ray/app

# Dependencies first, so code edits do not re-download torch & co. (the stub packages only let
# pip resolve the project; the real sources replace them below).
COPY --chown=ray:users pyproject.toml README.md ./
RUN for pkg in dpn_model pipelines tracking serve_apps jobs dpn_cli; do \
        mkdir -p $pkg && touch $pkg/__init__.py; done \
    && pip install . \
    && pip uninstall -y dpn-on-ray \
    && rm -rf dpn_model pipelines tracking serve_apps jobs dpn_cli build *.egg-info

COPY --chown=ray:users . .
# Editable install: the jobs find configs/ (e.g. configs/deepspeed/) next to their sources.
RUN pip install --no-deps -e . \
    && python -c "import dpn_model, pipelines, tracking, serve_apps, jobs, dpn_cli, ray; print('ray', ray.__version__)"

# Serve HTTP (8000), dashboard/jobs API (8265) and GCS (6379) are opened by KubeRay / ray start.
