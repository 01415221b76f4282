# One image; the Procfile's process types (web, worker, beat) run from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    BELLAQ_INSTANCE_DIR=/data \
    PORT=8080

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY bellaq ./bellaq
COPY workers ./workers
RUN pip install '.[mysql,s3]' honcho \
 && apt-get purge -y build-essential && apt-get autoremove -y \
 && useradd --create-home bellaq && mkdir -p /data && chown bellaq /data
COPY Procfile ./

USER bellaq
VOLUME /data
EXPOSE 8080
# `docker run IMAGE` serves the API; `docker run IMAGE worker` or `... beat` runs the others.
ENTRYPOINT ["sh", "-c", "exec honcho start -f /app/Procfile \"${0:-web}\""]
CMD ["web"]
