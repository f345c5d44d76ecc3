# The regcred controller image: a static binary (scripts/build-static.sh) on distroless/static,
# running as UID 65532. Build from the repository root:
#   docker build -t regcred:dev .

FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies first: manifests, the lockfile and stub sources, built with the same script and
# flags as the real build, so this layer is reused until Cargo.toml or Cargo.lock changes.
# (Cargo reads every workspace member's manifest and wants the file of each declared target
# without a `path`: tests/testenv's lib and every [[bench]] get empty stand-ins.)
COPY Cargo.toml Cargo.lock ./
COPY tests/testenv/Cargo.toml tests/testenv/
COPY scripts/build-static.sh scripts/
# hadolint ignore=SC2013
RUN mkdir -p src benches tests/testenv/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs tests/testenv/src/lib.rs \
 && for bench in $(awk '/^\[/ { b = ($0 == "[[bench]]") } b && $1 == "name" { gsub(/"/, "", $3); print $3 }' Cargo.toml); do \
      touch "benches/$bench.rs"; \
    done \
 && bash scripts/build-static.sh --no-check

# The real sources. touch: COPY keeps the files' modification times, which may be older than
# the stub build, and cargo would then keep the stub binary (the crdgen check would fail).
COPY src/ src/
COPY crds/ crds/
RUN touch src/main.rs src/lib.rs \
 && bash scripts/build-static.sh > /tmp/build-static.out \
 && cp "$(tail -n 1 /tmp/build-static.out)" /regcred

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="regcred" \
      org.opencontainers.image.description="Kubernetes controller that keeps kubernetes.io/dockerconfigjson pull Secrets correct" \
      org.opencontainers.image.source="https://github.com/regcred/regcred" \
      org.opencontainers.image.url="https://github.com/regcred/regcred" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/static-debian12:nonroot"
# The base image has /etc/passwd (nonroot = 65532) and /etc/ssl/certs/ca-certificates.crt, which
# the AWS client (ECR, STS) reads for its trusted roots.
COPY --from=build /regcred /usr/local/bin/regcred
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/regcred"]
CMD ["run"]
