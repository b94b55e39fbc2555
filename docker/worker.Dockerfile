# The compute path: CUDA PyTorch, open_clip and the model code. One container per GPU.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MODEL_DIR=/models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common common
COPY worker worker
# torch and torchvision come with the base image; this adds open_clip and the service's deps.
RUN pip install ".[worker]"
VOLUME /models
CMD ["prelabel-worker", "predict"]
