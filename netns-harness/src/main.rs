//! `netns-harness demo`, `bench [cycles]`, `bench-ipam`, `bench-burst`, `bench-scale [N…]`, `bench-api`, `soak [minutes]`,
//! `bench-nodeapi [cycles]`, `bench-groups [cycles]`, `bench-userspace [cycles]`, `bench-sriov [cycles]`,
//! `bench-stack [cycles]`
//! (only the IPAM, central API, node-side API, security-group, user-space or SR-IOV part)
//! and `vm [--sriov] COMMAND…`.

use std::process::ExitCode;

/// Runs a command in the VM from the current directory; its output is printed
/// and its exit code becomes ours. `--sriov` first gives the guest the
/// SR-IOV NIC with 7 VFs.
fn vm(argv: &[String]) -> Result<(), String> {
    let cwd = std::env::current_dir().map_err(|e| e.to_string())?;
    let timeout = std::time::Duration::from_secs(900);
    let (devices, argv) = match argv.split_first() {
        Some((flag, rest)) if flag == "--sriov" => {
            (netns_harness::vm::Devices { sriov_vfs: 7 }, rest)
        }
        _ => (netns_harness::vm::Devices::default(), argv),
    };
    let run = netns_harness::vm::run_with(argv, &cwd, &[], timeout, devices)
        .map_err(|e| e.to_string())?;
    print!("{}", run.output);
    eprintln!(
        "vm: exit {} after {:.1} s",
        run.exit_code,
        run.elapsed.as_secs_f64()
    );
    if run.exit_code == 0 {
        Ok(())
    } else {
        Err(format!(
            "exit code {} in the VM; console tail:\n{}",
            run.exit_code,
            tail(&run.console, 20)
        ))
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The cycle count after a bench command: 200 unless given.
fn cycles(args: &[String]) -> Result<usize, String> {
    match args.get(1).map(|c| c.parse::<usize>()) {
        None => Ok(200),
        Some(Ok(n)) if n > 0 => Ok(n),
        Some(_) => Err(format!(
            "{} takes a positive cycle count, not {:?}",
            args[0], args[1]
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("demo") => netns_harness::demo::run(),
        Some("bench") => cycles(&args).and_then(netns_harness::bench::run),
        Some("bench-nodeapi") => cycles(&args).and_then(netns_harness::bench_nodeapi::run),
        Some("bench-userspace") => cycles(&args).and_then(netns_harness::bench_userspace::run),
        Some("bench-stack") => cycles(&args).and_then(netns_harness::bench_stack::run),
        Some("bench-sriov") => cycles(&args).and_then(netns_harness::bench_sriov::run),
        Some("bench-groups") => cycles(&args).and_then(netns_harness::bench_groups::run),
        Some("bench-ipam") => netns_harness::bench_ipam::run(),
        Some("bench-burst") => netns_harness::bench_burst::run(),
        Some("bench-scale") => args[1..]
            .iter()
            .map(|a| a.parse::<usize>().map_err(|e| format!("bench-scale takes node counts: {a}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|sizes| netns_harness::bench_scale::run(&sizes)),
        Some("bench-api") => netns_harness::bench_api::run(),
        Some("soak") => match args.get(1).map(|a| a.parse::<f64>()) {
            None => netns_harness::soak::run(10.0),
            Some(Ok(m)) => netns_harness::soak::run(m),
            Some(Err(e)) => Err(format!("soak takes minutes: {e}")),
        },
        Some("vm") if args.len() > 1 => vm(&args[1..]),
        _ => Err(
            "usage: netns-harness demo | bench [cycles] | bench-ipam | bench-burst | bench-scale [N…] | bench-api | soak [minutes] | bench-nodeapi [cycles] | bench-groups [cycles] | bench-userspace [cycles] | bench-sriov [cycles] | bench-stack [cycles] | vm [--sriov] COMMAND [ARGS…]".into(),
        ),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netns-harness: {e}");
            ExitCode::FAILURE
        }
    }
}
