# ssm-golf reproduction image: the Parameter Golf evaluation environment as far as it is known (RunPod's
# parameter-golf image: Ubuntu 24.04, Python 3.12, PyTorch 2.9.1 + CUDA 12.8, Triton 3.5.1, no FlashAttention 3),
# with ssm-golf installed so that `builder` and `validator` run inside it. A devel base, so Triton and C++
# extensions compile.
#
#   docker build -t ssm-golf:latest .
#   docker run --gpus all --network none --shm-size=16g -v DATA:/data:ro ssm-golf:latest \
#       reproduce submissions/<folder> --nproc 8
#   docker run --gpus all --network none --shm-size=16g -v DATA:/data:ro -v FOLDER:/submission:ro ssm-golf:latest \
#       validator rerun /submission --data /data --nproc 8 --json /tmp/rerun.json
#
# DATA is the folder holding datasets/fineweb10B_sp1024/ and tokenizers/ (as `builder data` writes it).
# See docs/reproduce.md.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The distribution's packages follow the base image's Ubuntu 24.04 snapshot; the Python stack below is pinned.
# bubblewrap is not installed here: the container itself is the sandbox (docker run --network none, data :ro), and
# bwrap needs user namespaces that containers usually deny; `validator rerun --backend local` inside the image falls
# back to the network namespace / audit hook and says so in the report's isolation column. On a host, install it
# (apt-get install bubblewrap) and the local backend runs every child under bwrap.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev git lrzip ca-certificates util-linux iproute2 \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv "$VIRTUAL_ENV"
COPY docker/requirements.lock /tmp/requirements.lock
RUN pip install -r /tmp/requirements.lock \
    && python -c "import sys, torch, triton; assert sys.version_info[:2] == (3, 12); print(torch.__version__, triton.__version__)"

# The image's user; uid 1000 matches the docker backend's default (validator/sandbox/docker_backend.py).
RUN userdel --remove ubuntu 2>/dev/null || true \
    && useradd --create-home --uid 1000 --shell /bin/bash golfer

WORKDIR /opt/ssm-golf
COPY --chown=golfer:golfer . /opt/ssm-golf
RUN pip install --no-deps /opt/ssm-golf \
    && chmod 0755 /opt/ssm-golf/docker/entrypoint.sh \
    && validator --help > /dev/null

USER 1000:1000
ENTRYPOINT ["/opt/ssm-golf/docker/entrypoint.sh"]
CMD ["help"]
