# syntax=docker/dockerfile:1.7
# minigpt4-bot: the bot (and, with the ray extra, a Ray node that runs engine replicas) in one image.
#
#   CPU:   docker build -t minigpt4-bot:cpu .
#   CUDA:  docker build -t minigpt4-bot:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                       --build-arg EXTRAS=ray,gpu .
#
# The CUDA variant differs only in the torch wheel: PyTorch's CUDA wheels carry the CUDA runtime, so the
# host needs the NVIDIA driver and the NVIDIA Container Toolkit (docker run --gpus all), not a CUDA base image.
# Weights are never baked in: mount them read-only at /weights and point [model] at them (see the
# config below and docs/scaling.md). State (SQLite, demo weights) lives in the volume /var/lib/minigpt4-bot.
# Runs as the unprivileged user "bot" (uid 10001). Not built in this repository's CI (no registry access
# there); tests/scale/test_scale_packaging.py checks this file statically.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=ray
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/minigpt4-bot
ENV PATH=/opt/minigpt4-bot/bin:$PATH
# torch first, from the chosen index (CPU wheels by default: no CUDA libraries in the CPU image)
RUN pip install ${TORCH_SPEC} --index-url ${TORCH_INDEX}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY adapters ./adapters
COPY model ./model
COPY storage ./storage
COPY migrations ./migrations
RUN pip install ".[${EXTRAS}]"

FROM ${PYTHON_IMAGE}
ARG WITH_CHROMIUM=1
# chromium renders `website` previews (optional: without it answers carry the .html file only);
# tini reaps Ray's and Chromium's child processes and forwards SIGTERM for a clean shutdown.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini ca-certificates \
    && if [ "${WITH_CHROMIUM}" = "1" ]; then apt-get install -y --no-install-recommends chromium fonts-dejavu-core; fi \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/minigpt4-bot /opt/minigpt4-bot
ENV PATH=/opt/minigpt4-bot/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MINIGPT4_BOT_CONFIG=/etc/minigpt4-bot/bot.toml \
    HF_HUB_OFFLINE=1

RUN groupadd --gid 10001 bot \
    && useradd --uid 10001 --gid bot --create-home --home-dir /home/bot --shell /usr/sbin/nologin bot \
    && mkdir -p /var/lib/minigpt4-bot /weights /etc/minigpt4-bot \
    && chown bot:bot /var/lib/minigpt4-bot

# The default configuration: demo weights (mount real ones and a bot.toml of your own over this file),
# the web front end on all interfaces so the healthcheck and a reverse proxy reach it.
COPY <<'EOF' /etc/minigpt4-bot/bot.toml
# minigpt4-bot in a container. Mount your own file here (-v ./bot.toml:/etc/minigpt4-bot/bot.toml:ro);
# every key is documented in the repository's bot.toml. Secrets come from the environment
# (MINIGPT4_BOT_DATABASE_URL, SLACK_BOT_TOKEN, DISCORD_BOT_TOKEN ...).
data_dir = "/var/lib/minigpt4-bot"

[model]
# Real weights, mounted read-only at /weights, e.g.:
#   llm = "/weights/vicuna-7b"
#   vit = "/weights/eva_vit_g.pth"
#   qformer = "/weights/blip2_pretrained_flant5xxl.pth"
#   projection = "/weights/pretrained_minigpt4_7b.pth"
# Empty: tiny random demo weights (answers are nonsense).

[terminal]
enabled = false

[web]
host = "0.0.0.0"
port = 8080
EOF

USER 10001:10001
WORKDIR /home/bot
VOLUME ["/var/lib/minigpt4-bot"]
EXPOSE 8080
# /healthz is liveness only (no database): it answers once the model is loaded and the web port is open.
# Real 7B weights take minutes to load: hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["tini", "--", "minigpt4-bot"]
CMD ["serve", "--no-terminal"]
