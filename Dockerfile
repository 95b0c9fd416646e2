# The outbox's command-line image: `outbox relay`, `outbox consume`, `outbox db upgrade`,
# and the examples. Used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY outbox ./outbox
COPY migrations ./migrations
COPY examples ./examples
RUN pip install --no-cache-dir ".[metrics]" rich
ENTRYPOINT ["outbox"]
