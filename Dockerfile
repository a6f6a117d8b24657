# taskgate egress gateway.
#   docker build -t taskgate .
#   docker run -p 8080:8080 -p 8081:8081 -v taskgate-home:/var/lib/taskgate taskgate
# The full image: it has the C compiler that builds the JSON scanner (setup.py).
FROM python:3.12 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
COPY addons ./addons
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --home-dir /var/lib/taskgate --shell /usr/sbin/nologin taskgate \
 && mkdir -p /var/lib/taskgate /etc/taskgate \
 && chown taskgate:taskgate /var/lib/taskgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY configs/docker.yaml /etc/taskgate/taskgate.yaml
USER taskgate
WORKDIR /var/lib/taskgate
VOLUME ["/var/lib/taskgate"]
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["taskgate"]
CMD ["run", "-c", "/etc/taskgate/taskgate.yaml"]
