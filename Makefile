# Plexus — `make demo` runs the main job, `make test` the tests. Both install
# what they need from Debian first (`make deps`); run as root (netns, links).

CARGO    ?= cargo
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS     := etcd-server etcd-client protobuf-compiler libprotobuf-dev containernetworking-plugins iproute2 \
            linux-image-amd64 busybox-static time openssl nftables musl-tools \
            openvswitch-switch-dpdk dpdk-dev g++ containerd runc strace
DESTDIR  ?=
BINDIR   ?= /opt/cni/bin
TARGET   := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
# Release binaries are linked statically and not position-independent: no
# dynamic loader and no relocations to apply at each of the runtime's execs,
# and no page written by them. `--target` keeps these flags off build
# scripts and macros.
TRIPLE    = $(shell rustc -vV | sed -n 's/^host: //p')
RELEASE   = $(TARGET)/$(TRIPLE)/release
RELEASE_FLAGS := -C target-feature=+crt-static -C relocation-model=static
# `plexus`, the binary the runtime execs at every call, is built for musl
# where the toolchain has the target (`make deps` asks rustup for it): a
# static glibc start-up runs CPUID dozens of times, and each one traps in a
# VM (~0.4 ms an exec here). The host's triple otherwise.
MUSL      = $(shell uname -m)-unknown-linux-musl
PLEXUS_TRIPLE = $(shell rustup target list --installed 2>/dev/null | grep -qx '$(MUSL)' \
                && command -v musl-gcc >/dev/null && echo '$(MUSL)' || echo '$(TRIPLE)')
PLEXUS    = $(TARGET)/$(PLEXUS_TRIPLE)/release/plexus

.PHONY: all deps build build-release lint test fuzz demo bench bench-scale soak install clean

all: build

# qemu >= 8 (its emulated `igb` NIC has SR-IOV VFs for the VM tests) comes
# from Debian's bookworm-backports suite, signed by the same archive keyring.
BACKPORTS := /etc/apt/sources.list.d/bookworm-backports.sources
QEMU_MIN  := 8

# Install the Debian packages the build, the tests and the demo use.
deps:
	@[ -f $(BACKPORTS) ] || { echo "adding: bookworm-backports ($(BACKPORTS))"; \
		printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
		| $(SUDO) tee $(BACKPORTS) >/dev/null; }
	@v=$$(dpkg-query -W -f='$${Version}' qemu-system-x86 2>/dev/null | sed 's/^[0-9]*://; s/\..*//'); \
	if [ -z "$$v" ] || [ "$$v" -lt $(QEMU_MIN) ]; then \
		echo "installing: qemu-system-x86 from bookworm-backports"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			-t bookworm-backports qemu-system-x86; \
	fi
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@command -v kubectl >/dev/null || { echo "installing: kubernetes-client (kubectl)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends kubernetes-client; }
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup)"; exit 1; }
	@! command -v rustup >/dev/null || rustup target list --installed | grep -qx '$(MUSL)' || \
		rustup target add '$(MUSL)' || echo "no $(MUSL) target: plexus is built for $(TRIPLE)"

build: deps
	$(CARGO) build --workspace --bins

build-release: deps
	RUSTFLAGS="$(RELEASE_FLAGS)" $(CARGO) build --release --target $(TRIPLE) --workspace --bins
	RUSTFLAGS="$(RELEASE_FLAGS)" $(CARGO) build --release --target $(PLEXUS_TRIPLE) -p plugins --bin plexus

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Unit tests, then end-to-end tests against real netns, real etcd and the
# reference plugins. The binaries under test are the debug builds.
# The suites that exec `plexus` run again with it built for musl, as
# `make build-release` ships it (its own allocator and start-up).
SHIPPED_SUITES := --test contract --test meta --test veth --test crash --test containerd \
                  --test logs --test device_plugin --test ipam

test: build lint
	PLEXUS_BIN=$(TARGET)/debug/plexus $(CARGO) test --workspace
	@if [ "$(PLEXUS_TRIPLE)" != "$(TRIPLE)" ]; then \
		echo "again with plexus built for $(PLEXUS_TRIPLE), as make build-release ships it"; \
		$(CARGO) build --target $(PLEXUS_TRIPLE) -p plugins --bin plexus && \
		PLEXUS_BIN=$(TARGET)/$(PLEXUS_TRIPLE)/debug/plexus $(CARGO) test -p plexus-tests $(SHIPPED_SUITES); \
	fi
	tests/fuzz/run.sh --runs 300000

# Coverage-guided fuzzing (libFuzzer, stable toolchain) of the configs,
# definitions, the networks annotation, CNI_ARGS and results: each target for
# FUZZ_SECONDS (default 300). `make test` runs each on the same 300,000
# inputs every time (seed 1, fresh corpus).
FUZZ_SECONDS ?= 300
fuzz: deps
	tests/fuzz/run.sh $(FUZZ_SECONDS)

demo: build
	PLEXUS_BIN=$(TARGET)/debug/plexus $(TARGET)/debug/netns-harness demo

bench: build-release
	PLEXUS_BIN=$(PLEXUS) $(RELEASE)/netns-harness bench $(CYCLES)

# plexus-ipam in simulated clusters of 8, 64, 512 and 5,000 nodes against one
# 3-member etcd (not in `make test`; a few minutes). NODES="8 5000" for others.
bench-scale: build-release
	$(RELEASE)/netns-harness bench-scale $(NODES)

# Pods churned on two simulated nodes for SOAK_MINUTES (default 10): ADD and
# DEL p50/p99 and memory each minute; fails on any leak or duplicate (not in
# `make test`).
SOAK_MINUTES ?= 10
soak: build-release
	PLEXUS_BIN=$(PLEXUS) $(RELEASE)/netns-harness soak $(SOAK_MINUTES)

# The multi-call binary and one link per plugin name it answers to.
PLUGIN_NAMES := plexus-veth plexus-ipvlan plexus-macvlan plexus-userspace plexus-sriov plexus-ipam

SBINDIR  ?= /usr/local/bin

install: build-release
	install -D -m 0755 $(PLEXUS) $(DESTDIR)$(BINDIR)/plexus
	install -D -m 0755 $(RELEASE)/plexusd $(DESTDIR)$(SBINDIR)/plexusd
	install -D -m 0755 $(RELEASE)/plexusctl $(DESTDIR)$(SBINDIR)/plexusctl
	for n in $(PLUGIN_NAMES); do ln -sf plexus $(DESTDIR)$(BINDIR)/$$n; done

clean:
	$(CARGO) clean
