# Cocoon build and test entry points. See README.md.
SHELL := /bin/bash
BUILD := build
TARGET := x86_64-unknown-linux-gnu
CARGO ?= cargo
# Where `make install` puts binaries and guest files, and the runtime config it writes.
PREFIX ?= /usr/local
CONFIG ?= /etc/cocoon/config.toml
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all deps kernel lab-kernel rootfs guest build release install test test-unit test-vm \
        test-lab test-cri lint fuzz bench bench-vmm bench-agent bench-cri lab-shell demo clean FORCE

all: guest build

deps:
	scripts/install-deps.sh

# Guest kernel: tinyconfig + guest-kernel/guest.config, cached by config hash.
kernel:
	guest-kernel/build.sh guest $(BUILD)

# Test-lab kernel: x86_64_defconfig + kvm_guest.config + guest-kernel/lab.config.
lab-kernel:
	guest-kernel/build.sh lab $(BUILD)/lab

# The agent, statically linked (libseccomp too): it is the guest's only userspace.
# Optimised for size (8.5 MB -> 7.1 with opt-level s -> 6.3 with fat LTO): it is loaded,
# unpacked and copied at every boot, and each copy is guest memory the pod touches.
$(BUILD)/cocoon-agent: FORCE
	CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_LTO=fat \
	CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked \
	    --target $(TARGET) -p cocoon-agent
	@mkdir -p $(BUILD)
	cp target/$(TARGET)/release/cocoon-agent $@

# The VMM for benchmarks and installs: static too (less to load, ~1 MiB less RSS).
$(BUILD)/cocoon-vmm: FORCE
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked \
	    --target $(TARGET) -p cocoon-vmm
	@mkdir -p $(BUILD)
	cp target/$(TARGET)/release/cocoon-vmm $@

# The far side of vsock/network tests, static so it runs in test guests.
$(BUILD)/cocoon-vsock-probe: FORCE
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked \
	    --target $(TARGET) -p cocoon-integration --bin cocoon-vsock-probe
	@mkdir -p $(BUILD)
	cp target/$(TARGET)/release/cocoon-vsock-probe $@

rootfs: $(BUILD)/cocoon-agent
	rootfs/mkinitramfs.py $(BUILD)/cocoon-agent $(BUILD)/initramfs.cpio
	@echo "rootfs: $(BUILD)/initramfs.cpio ($$(stat -c %s $(BUILD)/initramfs.cpio) bytes)"

guest: kernel rootfs

build:
	$(CARGO) build --locked --workspace --all-targets

# The shim and the `cocoon` CLI as installed and benchmarked (the VMM: $(BUILD)/cocoon-vmm).
release:
	$(CARGO) build --release --locked -p containerd-shim-cocoon-v1 -p cocoon-runtime

# The shim, VMM and CLI into $(PREFIX)/bin (containerd finds the shim in its PATH), the
# guest kernel and initramfs into $(PREFIX)/share/cocoon, and $(CONFIG) unless it exists.
install: guest release $(BUILD)/cocoon-vmm
	PREFIX=$(PREFIX) CONFIG=$(CONFIG) BUILD=$(BUILD) scripts/install.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	# The fuzz runner (`make fuzz`) must keep compiling.
	$(CARGO) check --locked -q --manifest-path vmm/fuzz/Cargo.toml --bins

# Unit tests and host-level end-to-end tests (the guest image under QEMU TCG, the lab runner).
test-unit: guest lab-kernel
	$(CARGO) test --locked --workspace --exclude cocoon-integration
	$(CARGO) test --locked -p cocoon-integration --lib --bins --test guest_image --test agent \
	    --test install

test-lab: lab-kernel guest
	$(CARGO) test --locked -p cocoon-integration --test lab

# All VM-level tests, in one test-lab boot (directly on hosts with hardware KVM).
test-vm: guest lab-kernel $(BUILD)/cocoon-vsock-probe
	$(CARGO) build --locked -p cocoon-vmm
	$(CARGO) test --locked -p cocoon-integration --test vm
	$(CARGO) test --locked -p cocoon-integration --test agent_vm

# Pods through a private containerd's CRI API: runc (the baseline) on this host, cocoon
# with real VMs (inside one test-lab boot on hosts whose KVM cannot boot Linux).
test-cri: guest lab-kernel
	$(CARGO) build --locked -p cocoon-vmm -p containerd-shim-cocoon-v1
	$(CARGO) test --locked -p cocoon-integration --test cri

# Coverage-guided fuzzing of the VMM's guest-facing devices on stable Rust
# (vmm/fuzz/src/main.rs): every target for FUZZ_SECONDS from its corpus in
# vmm/fuzz/corpus/<target>/; prints the executions per target and fails on a crash, naming
# the file the crashing input was saved to. The build is instrumented with LLVM
# SanitizerCoverage through stable rustc flags (--target keeps them off build scripts and
# proc macros).
FUZZ_SECONDS ?= 60
FUZZ_SEED ?= 1
FUZZ_TARGET_DIR ?= $(CURDIR)/target/fuzz
FUZZ_RUSTFLAGS := -C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=3 \
    -C llvm-args=-sanitizer-coverage-inline-8bit-counters -C debug-assertions
fuzz:
	RUSTFLAGS="$(FUZZ_RUSTFLAGS)" CARGO_TARGET_DIR=$(FUZZ_TARGET_DIR) $(CARGO) build --locked \
	    --release --target $(TARGET) --manifest-path vmm/fuzz/Cargo.toml
	$(FUZZ_TARGET_DIR)/$(TARGET)/release/cocoon-vmm-fuzz --seconds $(FUZZ_SECONDS) \
	    --seed $(FUZZ_SEED) --corpus vmm/fuzz/corpus --crashes $(BUILD)/fuzz-crashes

# The whole suite. Fuzzing is bounded there: 9 targets x FUZZ_TEST_SECONDS plus the build.
FUZZ_TEST_SECONDS ?= 20
test: FUZZ_SECONDS = $(FUZZ_TEST_SECONDS)
test: lint test-unit test-lab test-vm test-cri fuzz

# Release binaries throughout: the static VMM and the release shim (target/release).
bench: guest lab-kernel release $(BUILD)/cocoon-vmm $(BUILD)/cocoon-vsock-probe
	COCOON_VMM=$(CURDIR)/$(BUILD)/cocoon-vmm COCOON_SHIM_DIR=$(CURDIR)/target/release \
	    $(CARGO) bench --locked -p cocoon-integration

# cocoon-vmm against QEMU microvm: boots in the lab (or on hardware KVM), first KVM_RUN and RSS natively.
bench-vmm: guest lab-kernel $(BUILD)/cocoon-vmm $(BUILD)/cocoon-vsock-probe
	COCOON_VMM=$(CURDIR)/$(BUILD)/cocoon-vmm $(CARGO) bench --locked -p cocoon-integration --bench vmm

# The guest agent inside a VM: exec round trip, container create+start.
bench-agent: guest lab-kernel $(BUILD)/cocoon-vmm
	COCOON_VMM=$(CURDIR)/$(BUILD)/cocoon-vmm $(CARGO) bench --locked -p cocoon-integration --bench agent

# runc against cocoon through one private containerd's CRI (in the lab where needed).
bench-cri: guest lab-kernel release $(BUILD)/cocoon-vmm
	COCOON_VMM=$(CURDIR)/$(BUILD)/cocoon-vmm COCOON_SHIM_DIR=$(CURDIR)/target/release \
	    $(CARGO) bench --locked -p cocoon-integration --bench cri

lab-shell: lab-kernel
	$(CARGO) run --locked -q -p cocoon-integration --bin cocoon-lab -- shell

# The main job: install what is missing, build kernel, agent, VMM and shim, install them
# (`make install`), start a private containerd with the cocoon runtime and a CNI bridge,
# run a pod whose container prints its kernel and hostname, show the output, clean up
# (inside the test lab on hosts whose KVM cannot boot Linux). It uses what was installed:
# the shim from $(PREFIX)/bin, the runtime config $(CONFIG).
demo: deps lab-kernel install
	COCOON_SHIM_DIR=$(PREFIX)/bin COCOON_CONFIG=$(CONFIG) \
	    $(CARGO) run --locked -q -p cocoon-integration --bin cocoon-demo

clean:
	rm -rf $(BUILD)
	$(CARGO) clean
