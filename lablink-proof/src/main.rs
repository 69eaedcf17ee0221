//! `proof ci|full [workloads] [soak]`: see the crate's documentation (`scripts/proof.sh`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match lablink_proof::run().await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            println!("\nPROOF FAILED: see the checks above");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            println!("\nPROOF ERROR: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
