//! `netns-harness demo` and `netns-harness bench [cycles]`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("demo") => netns_harness::demo::run(),
        Some("bench") => match args.get(1).map(|c| c.parse::<usize>()) {
            None => netns_harness::bench::run(200),
            Some(Ok(n)) if n > 0 => netns_harness::bench::run(n),
            Some(_) => Err(format!(
                "bench takes a positive cycle count, not {:?}",
                args[1]
            )),
        },
        _ => Err("usage: netns-harness demo | netns-harness bench [cycles]".into()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netns-harness: {e}");
            ExitCode::FAILURE
        }
    }
}
