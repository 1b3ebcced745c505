//! The VM's SR-IOV NIC (qemu's `igb`, its VFs enabled by the VM runner)
//! lent to a test node: the PF and the VFs' netdevs move from the VM's own
//! netns into the node's, which stands in for the host, and go back when
//! the loan is dropped.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::kernel;
use serde_json::Value;

/// A function of the NIC: its PCI address and, when it has one, its netdev
/// name at the time of the loan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub pci: String,
    pub name: Option<String>,
}

/// The NIC lent to one node netns.
pub struct SriovNic {
    pub node_ns: String,
    pub pf: Function,
    /// By VF number.
    pub vfs: Vec<Function>,
}

const PCI: &str = "/sys/bus/pci/devices";

fn link_target(path: &Path) -> Option<String> {
    std::fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// The driver bound to a PCI device.
pub fn driver(pci: &str) -> Option<String> {
    link_target(&Path::new(PCI).join(pci).join("driver"))
}

/// The netdevs of a netns (`None`: the VM's own) by their PCI device.
pub fn netdevs(ns: Option<&str>) -> Vec<(String, Value)> {
    let mut args = vec!["-j", "-d"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["link", "show"]);
    let text = kernel::ip(&args).unwrap_or_default();
    let all: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
    all.into_iter()
        .filter_map(|l| Some((l.get("parentdev")?.as_str()?.to_string(), l)))
        .collect()
}

/// The PF of the VM's `igb` NIC, if the VM has one.
pub fn igb_pf() -> Option<String> {
    let mut pfs: Vec<String> = std::fs::read_dir("/sys/bus/pci/drivers/igb")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(':'))
        .collect();
    pfs.sort();
    pfs.into_iter().next()
}

impl SriovNic {
    /// Lends the NIC to `node_ns`: waits until every netdev of the NIC is
    /// back in the VM's netns (a deleted netns hands its devices back in
    /// the kernel's own time), moves them there, and brings the PF up.
    pub fn lend(node_ns: &str) -> SriovNic {
        let pf_pci = igb_pf().expect("the VM has no igb PF: run with the SR-IOV NIC");
        let pf_dir = Path::new(PCI).join(&pf_pci);
        let mut vf_pcis: Vec<(u32, String)> = std::fs::read_dir(&pf_dir)
            .expect("PF dir")
            .filter_map(Result::ok)
            .filter_map(|e| {
                let n = e
                    .file_name()
                    .to_str()?
                    .strip_prefix("virtfn")?
                    .parse()
                    .ok()?;
                Some((n, link_target(&e.path())?))
            })
            .collect();
        vf_pcis.sort();
        let with_netdev = |pci: &String| driver(pci).as_deref() == Some("igbvf");
        let wanted: Vec<String> = std::iter::once(pf_pci.clone())
            .chain(vf_pcis.iter().map(|(_, p)| p.clone()).filter(with_netdev))
            .collect();
        let start = Instant::now();
        let here = loop {
            let here = netdevs(None);
            if wanted.iter().all(|p| here.iter().any(|(d, _)| d == p)) {
                break here;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the NIC's netdevs are not all back in the VM's netns: want {wanted:?}, have {:?}",
                here.iter().map(|(d, _)| d).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let name_of = |pci: &str| {
            here.iter()
                .find(|(d, _)| d == pci)
                .and_then(|(_, l)| l["ifname"].as_str().map(String::from))
        };
        let nic = SriovNic {
            node_ns: node_ns.to_string(),
            pf: Function {
                pci: pf_pci.clone(),
                name: name_of(&pf_pci),
            },
            vfs: vf_pcis
                .iter()
                .map(|(_, p)| Function {
                    pci: p.clone(),
                    name: name_of(p),
                })
                .collect(),
        };
        for f in std::iter::once(&nic.pf).chain(&nic.vfs) {
            if let Some(name) = &f.name {
                kernel::ip(&["link", "set", "dev", name, "netns", node_ns]).expect("lend");
            }
        }
        let pf = nic.pf.name.as_deref().expect("the PF's netdev");
        kernel::ip(&["-n", node_ns, "link", "set", "dev", pf, "up"]).expect("PF up");
        // Some VF settings (igb's rates) need the PF's link, which comes
        // up a moment after the PF does.
        let start = Instant::now();
        loop {
            let links = kernel::ip_json(node_ns, &["link", "show", "dev", pf]).unwrap_or_default();
            let carrier = links
                .first()
                .and_then(|l| l["flags"].as_array())
                .is_some_and(|f| f.iter().any(|x| x == "LOWER_UP"));
            if carrier {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the PF {pf} has no link"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nic
    }

    /// VF `n`'s settings as the PF reports them over netlink
    /// (`ip -j link show`'s `vfinfo_list` entry).
    pub fn vf_settings(&self, n: usize) -> Value {
        let pf = self.pf.name.as_deref().unwrap_or_default();
        let links = kernel::ip_json(&self.node_ns, &["link", "show", "dev", pf]).expect("PF");
        links
            .first()
            .and_then(|l| l["vfinfo_list"].as_array())
            .and_then(|vfs| vfs.iter().find(|v| v["vf"] == n).cloned())
            .unwrap_or_else(|| panic!("the PF reports no VF {n}"))
    }

    /// VF `n`'s netdev in a netns (`None`: the VM's own), if it is there.
    pub fn vf_netdev(&self, n: usize, ns: Option<&str>) -> Option<Value> {
        netdevs(ns)
            .into_iter()
            .find(|(d, _)| *d == self.vfs[n].pci)
            .map(|(_, l)| l)
    }

    /// Binds VF `n` to `driver` (`vfio-pci`, or `igbvf` to give it back).
    pub fn bind(&self, n: usize, driver_name: &str) {
        let pci = &self.vfs[n].pci;
        let dev = Path::new(PCI).join(pci);
        let write = |path: &Path, value: &str| {
            std::fs::write(path, value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        write(&dev.join("driver_override"), driver_name);
        if let Some(old) = driver(pci) {
            write(
                &Path::new("/sys/bus/pci/drivers").join(old).join("unbind"),
                pci,
            );
        }
        write(Path::new("/sys/bus/pci/drivers_probe"), pci);
        assert_eq!(driver(pci).as_deref(), Some(driver_name), "{pci} bound");
        // An igbvf netdev appears in the VM's netns (as `eth<N>`, maybe
        // the name of a device lent meanwhile); the node is the host.
        if let Some(l) = self.vf_netdev(n, None) {
            let name = l["ifname"].as_str().unwrap_or_default().to_string();
            let lent = self.vfs[n].name.clone().unwrap_or_else(|| format!("vf{n}"));
            kernel::ip(&[
                "link",
                "set",
                "dev",
                &name,
                "netns",
                &self.node_ns,
                "name",
                &lent,
            ])
            .expect("lend");
        }
    }
}

impl Drop for SriovNic {
    /// Gives back what is still in the node's netns (what a pod holds goes
    /// back to the VM's when the pod's netns is deleted).
    fn drop(&mut self) {
        for (pci, l) in netdevs(Some(&self.node_ns)) {
            let ours = pci == self.pf.pci || self.vfs.iter().any(|v| v.pci == pci);
            if let (true, Some(name)) = (ours, l["ifname"].as_str()) {
                let _ = kernel::ip(&[
                    "-n",
                    &self.node_ns,
                    "link",
                    "set",
                    "dev",
                    name,
                    "netns",
                    "1",
                ]);
            }
        }
    }
}
