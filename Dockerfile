FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=config.settings.production
WORKDIR /app
RUN useradd --create-home --uid 1000 callops
COPY pyproject.toml README.md ./
COPY callops ./callops
COPY config ./config
COPY manage.py ./
# collectstatic needs the production settings to load: placeholders that pass their checks
# (the public key is 32 zero bytes in base64), used for this one command only.
RUN pip install --no-cache-dir . \
    && DJANGO_SECRET_KEY=build DJANGO_ALLOWED_HOSTS=build DATABASE_URL=sqlite:////tmp/build.db \
       REDIS_URL=redis://build TELNYX_API_KEY=build \
       TELNYX_PUBLIC_KEY=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= \
       python manage.py collectstatic --no-input
USER callops
EXPOSE 8000
CMD ["gunicorn", "-c", "config/gunicorn.py", "config.wsgi:application"]
