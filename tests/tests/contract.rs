//! Bad input: each case gets the spec's error code and a message naming the
//! problem, exits non-zero, and leaves the node and the pod as they were.

use std::io::Write;
use std::process::{Command, Stdio};

use netns_harness::{kernel, scratch::plexus_bin};
use plexus_tests::*;
use serde_json::{json, Value};

struct Case {
    what: &'static str,
    env_drop: &'static [&'static str],
    stdin: Option<String>,
    annotation: Option<&'static str>,
    namespace: &'static str,
    code: u64,
    msg_has: &'static str,
}

fn run_plexus(node: &Node, env: &[(String, String)], stdin: &[u8]) -> (Option<i32>, Value) {
    let mut cmd = Command::new(plexus_bin());
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    (node.netns.enter_hook().expect("hook"))(&mut cmd);
    let mut child = cmd.spawn().expect("spawn plexus");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin);
    }
    let out = child.wait_with_output().expect("wait");
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), v)
}

#[test]
fn bad_input_gets_spec_errors_and_changes_nothing() {
    let node = Node::new("bad");
    let ipam = node.ipam_dir();
    node.define(
        "ok.yaml",
        &nad("data", None, &macvlan("1.0.0", &["192.168.70.0/24"], &ipam)),
    );
    node.define(
        "tenant.yaml",
        &nad(
            "mine",
            Some("blue"),
            &macvlan("1.0.0", &["192.168.71.0/24"], &ipam),
        ),
    );
    node.define("broken.yaml", "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata:\n  name: [unclosed\n");
    node.define(
        "badconf.yaml",
        &nad(
            "badconf",
            None,
            &json!({"cniVersion": "1.0.0", "name": "badconf"}),
        ),
    );
    let list = node.plexus_list("1.0.0", ptp("k8s", "1.0.0", &["10.250.0.0/24"], &ipam));
    let good_stdin = |annotation: Option<&str>| -> String {
        let mut conf = Value::Object(list.plugin_config(0, &serde_json::Map::new(), None));
        conf["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": annotation.map(|a| json!({"k8s.v1.cni.cncf.io/networks": a}))});
        conf.to_string()
    };
    let before = node.snapshot();
    let (pod_ns, _) = node.pod("default");

    let cases = [
        Case {
            what: "empty stdin",
            env_drop: &[],
            stdin: Some(String::new()),
            annotation: None,
            namespace: "default",
            code: 6,
            msg_has: "empty",
        },
        Case {
            what: "non-JSON stdin",
            env_drop: &[],
            stdin: Some("cniVersion: 1.0.0".into()),
            annotation: None,
            namespace: "default",
            code: 6,
            msg_has: "JSON",
        },
        Case {
            what: "missing CNI_COMMAND",
            env_drop: &["CNI_COMMAND"],
            stdin: None,
            annotation: None,
            namespace: "default",
            code: 4,
            msg_has: "CNI_COMMAND",
        },
        Case {
            what: "missing CNI_IFNAME",
            env_drop: &["CNI_IFNAME"],
            stdin: None,
            annotation: None,
            namespace: "default",
            code: 4,
            msg_has: "CNI_IFNAME",
        },
        Case {
            what: "missing CNI_NETNS",
            env_drop: &["CNI_NETNS"],
            stdin: None,
            annotation: None,
            namespace: "default",
            code: 4,
            msg_has: "CNI_NETNS",
        },
        Case {
            what: "unsupported cniVersion",
            env_drop: &[],
            stdin: Some(good_stdin(None).replace("\"1.0.0\"", "\"0.2.0\"")),
            annotation: None,
            namespace: "default",
            code: 1,
            msg_has: "incompatible",
        },
        Case {
            what: "unknown network",
            env_drop: &[],
            stdin: None,
            annotation: Some("data,nosuchnet"),
            namespace: "default",
            code: 7,
            msg_has: "nosuchnet",
        },
        Case {
            what: "malformed annotation",
            env_drop: &[],
            stdin: None,
            annotation: Some("data,,x/y/z"),
            namespace: "default",
            code: 7,
            msg_has: "k8s.v1.cni.cncf.io/networks",
        },
        Case {
            what: "malformed JSON annotation",
            env_drop: &[],
            stdin: None,
            annotation: Some("[{\"name\":"),
            namespace: "default",
            code: 7,
            msg_has: "k8s.v1.cni.cncf.io/networks",
        },
        Case {
            what: "definition that does not parse",
            env_drop: &[],
            stdin: None,
            annotation: Some("unclosed"),
            namespace: "default",
            code: 7,
            msg_has: "unclosed",
        },
        Case {
            what: "definition whose config is invalid",
            env_drop: &[],
            stdin: None,
            annotation: Some("badconf"),
            namespace: "default",
            code: 7,
            msg_has: "badconf.yaml",
        },
        Case {
            what: "another tenant's network",
            env_drop: &[],
            stdin: None,
            annotation: Some("blue/mine"),
            namespace: "red",
            code: 7,
            msg_has: "blue",
        },
        Case {
            what: "interface asked for twice",
            env_drop: &[],
            stdin: None,
            annotation: Some("data@x1,data@x1"),
            namespace: "default",
            code: 7,
            msg_has: "x1",
        },
        Case {
            what: "capability the network lacks",
            env_drop: &[],
            stdin: None,
            annotation: Some(r#"[{"name":"data","ips":["192.168.70.9/24"]}]"#),
            namespace: "default",
            code: 2,
            msg_has: "ips",
        },
    ];
    for case in cases {
        let env: Vec<(String, String)> = [
            ("CNI_COMMAND", "ADD".to_string()),
            ("CNI_CONTAINERID", "bad0".to_string()),
            ("CNI_NETNS", pod_ns.path_str()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", node.bin.display().to_string()),
            (
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME=p",
                    case.namespace
                ),
            ),
        ]
        .into_iter()
        .filter(|(k, _)| !case.env_drop.contains(k))
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let stdin = case
            .stdin
            .clone()
            .unwrap_or_else(|| good_stdin(case.annotation));
        let (status, out) = run_plexus(&node, &env, stdin.as_bytes());
        let what = case.what;
        assert_ne!(status, Some(0), "{what}: must exit non-zero");
        assert_eq!(out["code"].as_u64(), Some(case.code), "{what}: {out}");
        let text = format!(
            "{} {}",
            out["msg"].as_str().unwrap_or(""),
            out["details"].as_str().unwrap_or("")
        );
        assert!(
            text.contains(case.msg_has),
            "{what}: {out} should mention {:?}",
            case.msg_has
        );
        assert!(out["cniVersion"].is_string(), "{what}: {out}");
        if !case.env_drop.is_empty() {
            // An error in the environment is still answered in the
            // version of the config on stdin.
            assert_eq!(out["cniVersion"], json!("1.0.0"), "{what}: {out}");
        }
        node.assert_released(&pod_ns, what);
        assert_eq!(node.snapshot(), before, "{what}: node untouched");
    }
}

#[test]
fn bad_node_conf_is_refused() {
    let node = Node::new("badconf");
    let (pod_ns, pod) = node.pod("default");
    for (what, cluster, code) in [
        ("no type", json!({"cniVersion": "1.0.0", "name": "x"}), 7),
        (
            "unsupported delegate version",
            json!({"cniVersion": "9.0.0", "name": "x", "type": "ptp"}),
            1,
        ),
        (
            "unknown plugin",
            json!({"cniVersion": "1.0.0", "name": "x", "type": "nope"}),
            7,
        ),
        ("named without definition", json!("absent"), 7),
    ] {
        let list = node.plexus_list("1.0.0", cluster);
        let err = node.runtime.add(&list, &pod).expect_err(what);
        assert_eq!(err.code, code, "{what}: {err}");
        let names = kernel::link_names(pod_ns.name()).expect("links");
        assert_eq!(names, vec!["lo".to_string()], "{what}");
    }
    assert_eq!(node.records(), Vec::<String>::new());
}
