# The controller image for Docker users; `cargo xtask images` builds the same image without a
# container engine (tests/tests/chart.rs checks that user, entrypoint and labels agree).
#
#   cargo build --release -p beamlit-controller
#   docker build -f images/controller.Dockerfile \
#     --build-arg REVISION=$(git rev-parse HEAD) -t ghcr.io/beamlit/beamlit-controller:0.1.0 .
#
# distroless/cc is Debian 12's glibc, libgcc and CA certificates: what the binary links against
# when built on Debian 12, and what `cargo xtask images` copies from the build machine.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="beamlit-controller" \
      org.opencontainers.image.description="Beamlit offloading controller: decides what share of each model's traffic to offload" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/beamlit/beamlit-controller" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Beamlit"
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
COPY --chmod=755 target/release/beamlit-controller /usr/local/bin/beamlit-controller
# distroless' nonroot user.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/beamlit-controller"]
