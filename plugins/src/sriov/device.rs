//! A VF as the PCI bus shows it in sysfs: its PF, its number there and the
//! driver bound to it. Only PCI facts come from sysfs: its `net/`
//! directories list the netdevs of the namespace sysfs was mounted in, so
//! netdevs are found over netlink, by their parent device.

use std::path::Path;

use cni::{code, Error};

/// Where the kernel lists PCI devices.
pub const SYSFS_PCI: &str = "/sys/bus/pci/devices";

/// Drivers that hand a device to user space (DPDK): no netdev.
const USER_SPACE_DRIVERS: [&str; 3] = ["vfio-pci", "uio_pci_generic", "igb_uio"];

/// One VF and its PF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vf {
    /// Its PCI address.
    pub pci: String,
    /// Its PF's PCI address.
    pub pf: String,
    /// Its number on the PF (`virtfn<N>`).
    pub index: u32,
    /// The driver bound to it, if any.
    pub driver: Option<String>,
}

impl Vf {
    /// Bound to a user-space driver (`vfio-pci` and the like): DPDK mode.
    pub fn user_space(&self) -> bool {
        self.driver
            .as_deref()
            .is_some_and(|d| USER_SPACE_DRIVERS.contains(&d))
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(code::INVALID_NETWORK_CONFIG, msg)
}

/// Validates a PCI address (`0000:01:10.4`), lowercased. It names sysfs
/// paths and state files, so nothing else passes.
pub fn parse_pci(s: &str) -> Result<String, Error> {
    let bad = || {
        invalid(format!(
            "deviceID {s:?} is not a PCI address (domain:bus:device.function, as 0000:01:10.4)"
        ))
    };
    let lower = s.to_ascii_lowercase();
    let (domain, rest) = lower.split_once(':').ok_or_else(bad)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |p: &str, min: usize, max: usize| {
        (min..=max).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit())
    };
    let func_ok = func.len() == 1 && matches!(func.as_bytes()[0], b'0'..=b'7');
    if hex(domain, 4, 8) && hex(bus, 2, 2) && hex(dev, 2, 2) && func_ok {
        Ok(lower)
    } else {
        Err(bad())
    }
}

fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// The VF at `pci` under the sysfs PCI directory `root`; the error names
/// the address and what it is instead.
pub fn resolve(root: &Path, pci: &str) -> Result<Vf, Error> {
    let dev = root.join(pci);
    if !dev.exists() {
        return Err(invalid(format!(
            "{pci}: no such VF (no PCI device at that address)"
        )));
    }
    let Some(pf) = link_name(&dev.join("physfn")) else {
        let total = std::fs::read_to_string(dev.join("sriov_totalvfs")).ok();
        return Err(match total {
            Some(total) => invalid(format!(
                "{pci}: a PF (up to {} VFs), not a VF: name one of its VFs",
                total.trim()
            )),
            None => invalid(format!(
                "{pci}: not a VF, and a PF without SR-IOV (no sriov_totalvfs)"
            )),
        });
    };
    let pf_dir = root.join(&pf);
    let entries = std::fs::read_dir(&pf_dir).map_err(|e| {
        Error::new(
            code::IO_FAILURE,
            format!("{pci}: read PF {}", pf_dir.display()),
        )
        .with_details(e.to_string())
    })?;
    let index = entries
        .filter_map(Result::ok)
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("virtfn")?.parse::<u32>().ok()?;
            (link_name(&e.path()).as_deref() == Some(pci)).then_some(n)
        })
        .ok_or_else(|| invalid(format!("{pci}: PF {pf} does not list it among its VFs")))?;
    Ok(Vf {
        pci: pci.to_string(),
        pf,
        index,
        driver: link_name(&dev.join("driver")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn pci_addresses() {
        assert_eq!(parse_pci("0000:01:10.4").unwrap(), "0000:01:10.4");
        assert_eq!(parse_pci("0000:AF:00.1").unwrap(), "0000:af:00.1");
        for bad in [
            "",
            "01:10.4",
            "0000:01:10.8",
            "0000:01:10",
            "0000:1:10.4",
            "../../etc:01:10.4",
            "0000:01:10.4/x",
            "0000:01:10.4 ",
        ] {
            assert_eq!(parse_pci(bad).unwrap_err().code, 7, "{bad:?}");
        }
    }

    /// A sysfs PCI directory: a PF with two VFs (one on vfio-pci), and a
    /// NIC without SR-IOV.
    fn sysfs() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let drivers = r.join("drivers");
        for d in ["igb", "igbvf", "vfio-pci", "virtio-pci"] {
            std::fs::create_dir_all(drivers.join(d)).unwrap();
        }
        for (dev, driver) in [
            ("0000:01:00.0", "igb"),
            ("0000:01:10.0", "igbvf"),
            ("0000:01:10.2", "vfio-pci"),
            ("0000:00:02.0", "virtio-pci"),
        ] {
            std::fs::create_dir(r.join(dev)).unwrap();
            symlink(drivers.join(driver), r.join(dev).join("driver")).unwrap();
        }
        std::fs::write(r.join("0000:01:00.0/sriov_totalvfs"), "7\n").unwrap();
        for (n, vf) in [(0, "0000:01:10.0"), (1, "0000:01:10.2")] {
            symlink(
                format!("../{vf}"),
                r.join(format!("0000:01:00.0/virtfn{n}")),
            )
            .unwrap();
            symlink("../0000:01:00.0", r.join(vf).join("physfn")).unwrap();
        }
        t
    }

    #[test]
    fn resolves_vfs_and_names_what_is_not_one() {
        let t = sysfs();
        let vf = resolve(t.path(), "0000:01:10.2").unwrap();
        assert_eq!((vf.pf.as_str(), vf.index), ("0000:01:00.0", 1));
        assert!(vf.user_space());
        let vf = resolve(t.path(), "0000:01:10.0").unwrap();
        assert_eq!(vf.index, 0);
        assert!(!vf.user_space());
        let e = resolve(t.path(), "0000:01:10.4").unwrap_err();
        assert!(e.msg.contains("0000:01:10.4: no such VF"), "{e}");
        let e = resolve(t.path(), "0000:01:00.0").unwrap_err();
        assert!(e.msg.contains("a PF (up to 7 VFs), not a VF"), "{e}");
        let e = resolve(t.path(), "0000:00:02.0").unwrap_err();
        assert!(e.msg.contains("PF without SR-IOV"), "{e}");
    }
}
