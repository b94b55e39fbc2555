# The request path: Flask + gunicorn on common/, no torch and no worker code (a few hundred MB, not several GB).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common common
COPY backend backend
RUN pip install .
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2)"
CMD ["prelabel-backend", "--host", "0.0.0.0", "--port", "9090"]
