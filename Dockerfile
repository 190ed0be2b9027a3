# The project for NVIDIA drivers 580 and newer: build with
#   docker build -t inclusive-dali .
# and run with the folders of config.yaml mounted (see README.md, "Docker").
# The CUDA 13 runtime libraries come inside the torch (2.14.1+cu130) and DALI (nvidia-dali-cuda130)
# wheels, so a plain OS image is enough; the host provides the driver (NVIDIA container toolkit).
FROM ubuntu:24.04

# video: without it the NVIDIA container toolkit hides the hardware JPEG decoder (NVJPG) from the
# container, and nvJPEG silently decodes on the CUDA cores instead
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility,video
# tar: DALI's wds2idx indexes shards with GNU tar; gcc, libc6-dev, python3-dev: Triton compiles its
# launcher with them the first time model.compile runs
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev tar \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# pinned: the versions the project is tested with (they satisfy pyproject.toml); one CUDA (13) for both
RUN pip install torch==2.14.1 torchvision==0.29.1 nvidia-dali-cuda130==2.4.0 timm==1.0.31

# the bench extra: what the GPU check (python -m benchmarks.gpu_check, README step 4) and the benchmarks need;
# --build-arg EXTRAS= leaves it out
ARG EXTRAS="bench"
WORKDIR /source
COPY . /source
RUN pip install -e ".${EXTRAS:+[$EXTRAS]}"

# the default paths of config.yaml
VOLUME ["/original_images", "/inclusive", "/shards", "/artifacts", "/output"]
CMD ["bash"]
