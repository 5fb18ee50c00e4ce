# The agent image for Docker users; `cargo xtask images` builds the same image without a
# container engine (tests/tests/chart.rs checks that user, entrypoint and labels agree).
#
#   cargo build --release -p beamlit-agent      # builds the eBPF object too (cargo xtask setup)
#   docker build -f images/agent.Dockerfile \
#     --build-arg REVISION=$(git rev-parse HEAD) -t ghcr.io/beamlit/beamlit-agent:0.1.0 .
#
# distroless/cc is Debian 12's glibc, libgcc and CA certificates: what the binary links against
# when built on Debian 12, and what `cargo xtask images` copies from the build machine.
FROM gcr.io/distroless/cc-debian12
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="beamlit-agent" \
      org.opencontainers.image.description="Beamlit offloading agent: eBPF redirection and the egress tunnel on every node" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/beamlit/beamlit-controller" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Beamlit"
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
COPY --chmod=755 target/release/beamlit-agent /usr/local/bin/beamlit-agent
# Root, because the node's bpffs pins and cgroup directory belong to root; the chart drops every
# capability but BPF, NET_ADMIN and PERFMON (not privileged).
USER 0:0
ENTRYPOINT ["/usr/local/bin/beamlit-agent"]
