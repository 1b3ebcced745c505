//! SR-IOV virtual functions as their PF's netdev holds them (the
//! `IFLA_VFINFO_LIST` of a link, read with `RTEXT_FILTER_VF` and written one
//! `IFLA_VF_*` attribute per message), and what moving a device's netdev
//! between namespaces needs: finding it by its device, moving it under a
//! name, setting its MAC.

use std::fmt;
use std::os::fd::AsRawFd;

use cni::Error;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkVfInfo, VfInfo, VfInfoLinkState, VfInfoMac, VfInfoRate,
    VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan, VfLinkState, VfVlan, VfVlanInfo, VlanProtocol,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::LinkUnspec;
use serde::{Deserialize, Serialize};

use super::{mac_string, nl_err, Link, Netns};

/// The tag protocol of a VF's port VLAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum VlanProto {
    #[default]
    #[serde(rename = "802.1Q")]
    Dot1Q,
    #[serde(rename = "802.1ad")]
    Dot1Ad,
}

impl fmt::Display for VlanProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VlanProto::Dot1Q => "802.1Q",
            VlanProto::Dot1Ad => "802.1ad",
        })
    }
}

/// A VF's administrative link state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VfLink {
    /// Follows the PF's link.
    #[default]
    Auto,
    Enable,
    Disable,
}

impl fmt::Display for VfLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VfLink::Auto => "auto",
            VfLink::Enable => "enable",
            VfLink::Disable => "disable",
        })
    }
}

/// One VF's settings as its PF reports them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VfConfig {
    pub mac: [u8; 6],
    pub vlan: u16,
    pub qos: u8,
    pub proto: VlanProto,
    pub spoofchk: bool,
    pub trust: bool,
    pub link_state: VfLink,
    /// Mbps; 0 is no limit.
    pub min_tx_rate: u32,
    pub max_tx_rate: u32,
}

/// One setting of a VF, written as one attribute: the PF's driver applies
/// it or refuses it on its own, so a refusal names exactly what it refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VfSetting {
    Mac([u8; 6]),
    Vlan { id: u16, qos: u8, proto: VlanProto },
    SpoofCheck(bool),
    Trust(bool),
    LinkState(VfLink),
    Rate { min: u32, max: u32 },
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

impl fmt::Display for VfSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VfSetting::Mac(m) => write!(f, "mac {}", mac_string(m)),
            VfSetting::Vlan { id, qos, proto } => write!(f, "vlan {id} qos {qos} proto {proto}"),
            VfSetting::SpoofCheck(b) => write!(f, "spoofchk {}", on_off(*b)),
            VfSetting::Trust(b) => write!(f, "trust {}", on_off(*b)),
            VfSetting::LinkState(s) => write!(f, "link_state {s}"),
            VfSetting::Rate { min, max } => {
                write!(f, "min_tx_rate {min} max_tx_rate {max} (Mbps)")
            }
        }
    }
}

impl VfSetting {
    /// The value of the same setting in `config`: what to put back.
    pub fn current(&self, config: &VfConfig) -> VfSetting {
        match self {
            VfSetting::Mac(_) => VfSetting::Mac(config.mac),
            VfSetting::Vlan { .. } => VfSetting::Vlan {
                id: config.vlan,
                qos: config.qos,
                proto: config.proto,
            },
            VfSetting::SpoofCheck(_) => VfSetting::SpoofCheck(config.spoofchk),
            VfSetting::Trust(_) => VfSetting::Trust(config.trust),
            VfSetting::LinkState(_) => VfSetting::LinkState(config.link_state),
            VfSetting::Rate { .. } => VfSetting::Rate {
                min: config.min_tx_rate,
                max: config.max_tx_rate,
            },
        }
    }

    /// Whether `config` holds this setting.
    pub fn holds(&self, config: &VfConfig) -> bool {
        self.current(config) == *self
    }

    fn attribute(&self, vf: u32) -> VfInfo {
        match *self {
            VfSetting::Mac(m) => VfInfo::Mac(VfInfoMac::new(vf, &m)),
            // The plain attribute is 802.1Q; another protocol needs the list.
            VfSetting::Vlan {
                id,
                qos,
                proto: VlanProto::Dot1Q,
            } => VfInfo::Vlan(VfInfoVlan::new(vf, id.into(), qos.into())),
            VfSetting::Vlan {
                id,
                qos,
                proto: VlanProto::Dot1Ad,
            } => VfInfo::VlanList(vec![VfVlan::Info(VfVlanInfo::new(
                vf,
                id.into(),
                qos.into(),
                VlanProtocol::Ieee8021Ad,
            ))]),
            VfSetting::SpoofCheck(b) => VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, b)),
            VfSetting::Trust(b) => VfInfo::Trust(VfInfoTrust::new(vf, b)),
            VfSetting::LinkState(s) => VfInfo::LinkState(VfInfoLinkState::new(
                vf,
                match s {
                    VfLink::Auto => VfLinkState::Auto,
                    VfLink::Enable => VfLinkState::Enable,
                    VfLink::Disable => VfLinkState::Disable,
                },
            )),
            VfSetting::Rate { min, max } => VfInfo::Rate(VfInfoRate::new(vf, min, max)),
        }
    }
}

/// The VFs of one `IFLA_VFINFO_LIST`, by VF number.
fn configs(list: &[LinkVfInfo]) -> Vec<(u32, VfConfig)> {
    let mut out = Vec::new();
    for LinkVfInfo(infos) in list {
        let mut id = None;
        let mut c = VfConfig::default();
        for info in infos {
            match info {
                VfInfo::Mac(m) => {
                    id = Some(m.vf_id);
                    c.mac.copy_from_slice(&m.mac[..6]);
                }
                VfInfo::Vlan(v) => {
                    c.vlan = v.vlan_id as u16;
                    c.qos = v.qos as u8;
                }
                VfInfo::VlanList(list) => {
                    if let Some(VfVlan::Info(v)) = list.first() {
                        c.vlan = v.vlan_id as u16;
                        c.qos = v.qos as u8;
                        c.proto = match v.protocol {
                            VlanProtocol::Ieee8021Ad => VlanProto::Dot1Ad,
                            _ => VlanProto::Dot1Q,
                        };
                    }
                }
                VfInfo::SpoofCheck(s) => c.spoofchk = s.enabled,
                VfInfo::Trust(t) => c.trust = t.enabled,
                VfInfo::LinkState(l) => {
                    c.link_state = match l.state {
                        VfLinkState::Enable => VfLink::Enable,
                        VfLinkState::Disable => VfLink::Disable,
                        _ => VfLink::Auto,
                    }
                }
                VfInfo::Rate(r) => {
                    c.min_tx_rate = r.min_tx_rate;
                    c.max_tx_rate = r.max_tx_rate;
                }
                _ => {}
            }
        }
        if let Some(id) = id {
            out.push((id, c));
        }
    }
    out
}

impl Netns {
    /// The VFs of the PF whose netdev is link `pf`, as it reports them.
    pub fn vfs(&self, pf: u32) -> Result<Vec<(u32, VfConfig)>, Error> {
        let what = || format!("VFs of link {pf} in {}", self.path);
        self.rt.block_on(async {
            let mut links = self
                .handle
                .link()
                .get()
                .match_index(pf)
                .set_filter_mask(AddressFamily::Unspec, vec![LinkExtentMask::Vf])
                .execute();
            let msg = links
                .try_next()
                .await
                .map_err(|e| nl_err(what(), e))?
                .ok_or_else(|| nl_err(what(), "no such link"))?;
            Ok(msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::VfInfoList(list) => Some(configs(list)),
                    _ => None,
                })
                .unwrap_or_default())
        })
    }

    /// Sets one setting of VF `vf` through its PF's netdev, link `pf`.
    pub fn set_vf(&self, pf: u32, vf: u32, setting: &VfSetting) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(pf)
            .append_extra_attribute(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![
                setting.attribute(vf)
            ])]))
            .build();
        self.set(msg, format!("set VF {vf} {setting} on link {pf}"))
    }

    /// The netdev of the device `device` (a PCI address), if this
    /// namespace holds it.
    pub fn link_of_device(&self, device: &str) -> Result<Option<Link>, Error> {
        Ok(self
            .links()?
            .into_iter()
            .find(|l| l.parent.as_deref() == Some(device)))
    }

    /// Moves link `index`, down, into `to`, named `name` there (one message:
    /// the name is taken in the target namespace, never here).
    pub fn move_link(&self, index: u32, to: &Netns, name: &str) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index)
            .down()
            .name(name.to_string())
            .setns_by_fd(to.file.as_raw_fd())
            .build();
        self.set(msg, format!("move link {index} to {} as {name}", to.path))
    }

    /// Renames link `index` (down, as the kernel wants it for a rename).
    pub fn rename(&self, index: u32, name: &str) -> Result<(), Error> {
        self.set(
            LinkUnspec::new_with_index(index)
                .down()
                .name(name.to_string())
                .build(),
            format!("rename link {index} to {name}"),
        )
    }

    /// Sets a link's MAC address.
    pub fn set_mac(&self, index: u32, mac: &[u8]) -> Result<(), Error> {
        self.set(
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .build(),
            format!("set MAC {} of link {index}", mac_string(mac)),
        )
    }

    /// Takes a link down.
    pub fn down(&self, index: u32) -> Result<(), Error> {
        self.set(
            LinkUnspec::new_with_index(index).down().build(),
            format!("set link {index} down"),
        )
    }

    /// Whether `other` is this same namespace (the same nsfs inode).
    pub fn same_as(&self, other: &Netns) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), other.file.metadata()) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_back_and_put_back() {
        let list = vec![LinkVfInfo(vec![
            VfInfo::Mac(VfInfoMac::new(2, &[2, 0, 0, 0, 2, 2])),
            VfInfo::Vlan(VfInfoVlan::new(2, 100, 3)),
            VfInfo::VlanList(vec![VfVlan::Info(VfVlanInfo::new(
                2,
                100,
                3,
                VlanProtocol::Ieee8021Ad,
            ))]),
            VfInfo::SpoofCheck(VfInfoSpoofCheck::new(2, false)),
            VfInfo::Trust(VfInfoTrust::new(2, true)),
            VfInfo::LinkState(VfInfoLinkState::new(2, VfLinkState::Disable)),
            VfInfo::Rate(VfInfoRate::new(2, 0, 100)),
        ])];
        let got = configs(&list);
        let want = VfConfig {
            mac: [2, 0, 0, 0, 2, 2],
            vlan: 100,
            qos: 3,
            proto: VlanProto::Dot1Ad,
            spoofchk: false,
            trust: true,
            link_state: VfLink::Disable,
            min_tx_rate: 0,
            max_tx_rate: 100,
        };
        assert_eq!(got, vec![(2, want.clone())]);
        let asked = VfSetting::Vlan {
            id: 100,
            qos: 3,
            proto: VlanProto::Dot1Q,
        };
        assert!(!asked.holds(&want), "the protocol differs");
        assert_eq!(
            asked.current(&want).to_string(),
            "vlan 100 qos 3 proto 802.1ad"
        );
        assert!(VfSetting::Trust(true).holds(&want));
        assert_eq!(
            VfSetting::SpoofCheck(true).current(&want),
            VfSetting::SpoofCheck(false)
        );
        assert_eq!(
            VfSetting::Rate { min: 0, max: 100 }.to_string(),
            "min_tx_rate 0 max_tx_rate 100 (Mbps)"
        );
        let back: VfSetting =
            serde_json::from_str(&serde_json::to_string(&asked).unwrap()).unwrap();
        assert_eq!(back, asked);
    }
}
