# hallmark's service image: a release build of the default feature set (no libtorch), run as an
# unprivileged user with its data (SQLite database, sealing key, releases, uploads) in a volume.
#   docker build -t hallmark .
#   docker run -p 8080:8080 -v hallmark-data:/var/lib/hallmark hallmark
# The bootstrap admin key is written to /var/lib/hallmark/admin.key on first start.
# For PostgreSQL pass -e HALLMARK_DATABASE_URL=postgres://… -e HALLMARK_SECRET_KEY=<64 hex>.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The manifest first, so dependency builds are cached while only the sources change.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin hallmark 2>/dev/null || true
COPY src src
COPY migrations migrations
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin hallmark \
    && strip target/release/hallmark

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/hallmark hallmark
COPY --from=build /src/target/release/hallmark /usr/local/bin/hallmark
COPY watermark_specs /usr/share/hallmark/watermark_specs
USER hallmark
WORKDIR /var/lib/hallmark
ENV HALLMARK_BIND=0.0.0.0:8080 \
    HALLMARK_DATA_DIR=/var/lib/hallmark \
    HALLMARK_DATASET_ROOTS=/var/lib/hallmark/imports
VOLUME ["/var/lib/hallmark"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["hallmark", "health", "--url", "http://127.0.0.1:8080"]
ENTRYPOINT ["hallmark"]
CMD ["serve"]
