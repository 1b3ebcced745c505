//! A VM runner for kernel features the host lacks (ipvlan, vlan, dummy, vrf,
//! SR-IOV): boots Debian's `linux-image-amd64` under qemu (TCG; nested KVM
//! hangs here) with an initramfs built on the fly, shares the host `/`
//! read-only and a results dir read-write over 9p, runs one command inside
//! (chrooted into the host's root, so the same binaries and libraries are
//! used), and returns its exit code and output. On request the guest also
//! gets an SR-IOV NIC: qemu's emulated Intel 82576 (`igb`, qemu 8 or later)
//! with its VFs enabled, behind an emulated IOMMU so that a VF can be bound
//! to `vfio-pci` (Debian's kernel has no VFIO no-IOMMU mode).

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::scratch::Scratch;

/// Modules loaded before the command runs (the guest cannot autoload them:
/// its `modprobe` helper would run in the initramfs, not the chroot).
pub const MODULES: [&str; 12] = [
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "veth",
    "macvlan",
    "ipvlan",
    "8021q",
    "dummy",
    "vrf",
    "bridge",
    "tun",
    "vxlan",
];

/// Loaded as well when the guest has the SR-IOV NIC: the PF and VF
/// drivers, and VFIO for VFs handed to user space.
pub const SRIOV_MODULES: [&str; 5] = ["igb", "igbvf", "vfio", "vfio_iommu_type1", "vfio-pci"];

/// What the guest gets besides its disks-less basics (9p shares, no network).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Devices {
    /// An `igb` PF (82576) on a PCIe root port, with this many VFs (at most
    /// 7) enabled before the command runs; 0 for no such NIC. The guest
    /// then runs on a q35 machine with an Intel IOMMU (`iommu=pt`).
    pub sriov_vfs: u8,
}

/// What the command inside printed and how it ended.
#[derive(Debug)]
pub struct VmRun {
    pub exit_code: i32,
    /// The command's stdout and stderr.
    pub output: String,
    /// The serial console (kernel and init messages), for diagnosis.
    pub console: String,
    pub elapsed: Duration,
}

/// The newest installed Debian kernel: `(vmlinuz, version)`.
pub fn kernel() -> io::Result<(PathBuf, String)> {
    let mut kernels: Vec<String> = std::fs::read_dir("/boot")?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|n| n.strip_prefix("vmlinuz-").map(str::to_string))
        .filter(|v| {
            Path::new("/lib/modules")
                .join(v)
                .join("modules.dep")
                .exists()
        })
        .collect();
    kernels.sort();
    let version = kernels.pop().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no /boot/vmlinuz-* with modules: apt-get install linux-image-amd64",
        )
    })?;
    Ok((PathBuf::from(format!("/boot/vmlinuz-{version}")), version))
}

/// The modules to load, dependencies first, as paths under `/lib/modules/<v>`.
fn module_order(version: &str, names: &[&str]) -> io::Result<Vec<String>> {
    let dep = std::fs::read_to_string(format!("/lib/modules/{version}/modules.dep"))?;
    let deps: Vec<(String, Vec<String>)> = dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((
                m.to_string(),
                d.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect();
    let find = |name: &str| -> Option<&(String, Vec<String>)> {
        let file = format!("{name}.ko");
        let alt = file.replace('_', "-");
        deps.iter()
            .find(|(m, _)| m.ends_with(&format!("/{file}")) || m.ends_with(&format!("/{alt}")))
    };
    fn visit(
        m: &str,
        deps: &[(String, Vec<String>)],
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_string()) {
            return;
        }
        if let Some((_, ds)) = deps.iter().find(|(k, _)| k == m) {
            for d in ds.iter().rev() {
                visit(d, deps, seen, out);
            }
        }
        out.push(m.to_string());
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for name in names {
        // A module built into this kernel has no file; that is fine.
        if let Some((m, _)) = find(name) {
            visit(m, &deps, &mut seen, &mut out);
        }
    }
    Ok(out)
}

/// A newc cpio archive, the format the kernel unpacks as initramfs.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let header =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        self.ino += 1;
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, b"");
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.out
    }
}

const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules); do $B insmod /mods/$m 2>/dev/null || echo "init: insmod $m failed"; done
if [ -f /sriov_numvfs ]; then
  for pf in /sys/bus/pci/drivers/igb/0000:*; do
    $B cat /sriov_numvfs > $pf/sriov_numvfs || echo "init: no VFs on $pf"
  done
fi
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /host || echo "init: no host root"
$B mount -t proc proc /host/proc
$B mount -t sysfs sys /host/sys
$B mount -t devtmpfs dev /host/dev
$B mount -t tmpfs tmpfs /host/run
$B mkdir -p /host/run/vmtmp /host/run/netns /host/run/vmresults
$B mount -t 9p -o trans=virtio,version=9p2000.L results /host/run/vmresults || echo "init: no results share"
R=/host/run/vmresults
$B chroot /host /bin/sh /run/vmresults/cmd.sh > $R/output 2>&1
echo $? > $R/rc
$B sync
$B poweroff -f
"#;

fn build_initramfs(version: &str, path: &Path, devices: Devices) -> io::Result<()> {
    let mut cpio = Cpio::new();
    for d in ["bin", "proc", "sys", "dev", "host", "mods"] {
        cpio.dir(d);
    }
    cpio.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?);
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut names: Vec<&str> = MODULES.to_vec();
    if devices.sriov_vfs > 0 {
        names.extend(SRIOV_MODULES);
        cpio.file(
            "sriov_numvfs",
            0o644,
            format!("{}\n", devices.sriov_vfs.min(7)).as_bytes(),
        );
    }
    let mut list = String::new();
    for m in module_order(version, &names)? {
        let file = m.replace('/', "_");
        cpio.file(
            &format!("mods/{file}"),
            0o644,
            &std::fs::read(format!("/lib/modules/{version}/{m}"))?,
        );
        list.push_str(&file);
        list.push('\n');
    }
    cpio.file("modules", 0o644, list.as_bytes());
    std::fs::write(path, cpio.finish())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Boots the VM and runs `argv` inside, from `cwd`, with `env` set and
/// `TMPDIR` on a tmpfs; the VM is killed after `timeout`.
pub fn run(
    argv: &[String],
    cwd: &Path,
    env: &[(String, String)],
    timeout: Duration,
) -> io::Result<VmRun> {
    run_with(argv, cwd, env, timeout, Devices::default())
}

/// The qemu arguments for the machine and its extra devices.
fn machine_args(devices: Devices) -> (Vec<&'static str>, &'static str) {
    let plain = "console=ttyS0 quiet loglevel=3 panic=-1";
    if devices.sriov_vfs == 0 {
        return (vec!["-nic", "none"], plain);
    }
    (
        vec![
            "-machine",
            "q35",
            // Interrupt remapping needs a split irqchip under KVM; TCG has none.
            "-device",
            "intel-iommu,intremap=off",
            "-nic",
            "none",
            // A hub port with nothing else on the hub: the PF's link is up
            // and its frames go nowhere.
            "-netdev",
            "hubport,id=sriov0,hubid=0",
            "-device",
            "pcie-root-port,id=rp1,chassis=1,slot=1",
            "-device",
            "igb,bus=rp1,netdev=sriov0,mac=52:54:00:5a:00:01",
        ],
        "console=ttyS0 quiet loglevel=3 panic=-1 intel_iommu=on iommu=pt",
    )
}

/// [`run`] with extra devices in the guest.
pub fn run_with(
    argv: &[String],
    cwd: &Path,
    env: &[(String, String)],
    timeout: Duration,
    devices: Devices,
) -> io::Result<VmRun> {
    let (vmlinuz, version) = kernel()?;
    let scratch = Scratch::new("vm")?;
    let initramfs = scratch.join("initramfs.cpio");
    build_initramfs(&version, &initramfs, devices)?;
    let (machine, cmdline) = machine_args(devices);
    let results = scratch.join("results");
    std::fs::create_dir_all(&results)?;
    let mut cmd = String::from("export TMPDIR=/run/vmtmp PLEXUS_IN_VM=1\n");
    for (k, v) in env {
        cmd.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    cmd.push_str(&format!("cd {}\n", shell_quote(&cwd.display().to_string())));
    let quoted: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    cmd.push_str(&format!("exec {}\n", quoted.join(" ")));
    std::fs::write(results.join("cmd.sh"), cmd)?;

    let console_path = scratch.join("console.log");
    let console = std::fs::File::create(&console_path)?;
    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1536", "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        .args(&machine)
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", cmdline])
        .args([
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        ])
        .args(["-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"])
        .arg("-fsdev")
        .arg(format!(
            "local,id=results,path={},security_model=none",
            results.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=results,mount_tag=results"])
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("start qemu-system-x86_64: {e}")))?;
    let timed_out = loop {
        if qemu.try_wait()?.is_some() {
            break false;
        }
        if start.elapsed() > timeout {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = std::fs::read_to_string(&console_path).unwrap_or_default();
    let output = std::fs::read_to_string(results.join("output")).unwrap_or_default();
    let rc = std::fs::read_to_string(results.join("rc"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let exit_code = match (timed_out, rc) {
        (true, _) => {
            let _ = writeln!(io::stderr(), "vm: timed out after {timeout:?}");
            -1
        }
        (false, Some(rc)) => rc,
        (false, None) => -2,
    };
    Ok(VmRun {
        exit_code,
        output,
        console,
        elapsed: start.elapsed(),
    })
}
