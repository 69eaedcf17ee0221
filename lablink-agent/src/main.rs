//! `lablink-agent`: the LabLink VM agent. Settings come from the environment: `ALLOCATOR_URL`,
//! `VM_NAME`, `API_TOKEN` and the `LABLINK_*` options of `lablink_agent::AgentConfig`.

use std::process::ExitCode;

fn main() -> ExitCode {
    // One thread: the agent waits almost all the time, and stays small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(lablink_agent::main_from_env()),
        Err(e) => {
            eprintln!("lablink-agent: cannot start its runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
