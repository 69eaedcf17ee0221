//! `lablink-agent`: the LabLink VM agent. Without arguments it runs the agent, with settings
//! from the environment: `ALLOCATOR_URL`, `VM_NAME`, `API_TOKEN` and the `LABLINK_*` options
//! of `lablink_agent::AgentConfig` (or the file named by `LABLINK_AGENT_CONFIG`).
//! `lablink-agent register ...` and `lablink-agent unregister` join a lab's own machine to an
//! allocator's pool and take it out again (`lablink-agent --help`).

use std::process::ExitCode;

fn main() -> ExitCode {
    // One thread: the agent waits almost all the time, and stays small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(lablink_agent::main_from_args(std::env::args_os().skip(1))),
        Err(e) => {
            eprintln!("lablink-agent: cannot start its runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
