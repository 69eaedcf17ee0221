//! Values given to the module reach it unchanged: the variables file is JSON written by
//! serde_json, never HCL text, so quotes, `${...}`, `%{...}`, newlines and backslashes are
//! data, not syntax.

mod common;

use common::*;
use lablink_core::{AgentToken, LaunchRequest, Provisioner, VmSpec};
use serde_json::json;

const TRICKY: &str = "q\"uote 'single' ${var.vms} %{ if true }x%{ endif } back\\slash \\n\nnew line\t$(id) `id` }\"{";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_with_quotes_templates_newlines_and_backslashes_round_trip_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let echo = json!({
        "text": TRICKY,
        "list": [TRICKY, "plain"],
        "nested": { "key with \"quotes\" and ${x}": TRICKY },
    });
    let p = builder(dir.path())
        .with_variables(vars(&[
            ("echo", echo.clone()),
            ("allocator_url", json!(TRICKY)),
        ]))
        .build()
        .unwrap();
    let request = LaunchRequest {
        vms: vec![VmSpec {
            hostname: "vm-1".parse().unwrap(),
            token: AgentToken::from(TRICKY.to_owned()),
        }],
        ..Default::default()
    };
    let vms = p.launch(&request).await.unwrap();
    assert_eq!(vms.len(), 1);

    let outputs = outputs(dir.path());
    assert_eq!(
        outputs["echo"]["value"], echo,
        "a variable changed on its way"
    );
    assert_eq!(
        outputs["vm_tokens"]["value"]["vm-1"],
        json!(TRICKY),
        "the token changed on its way"
    );

    // The next launch keeps the tricky token as it is: vm-1 is not replaced.
    let again = p.launch(&common::request(&["vm-2"])).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        ids(&p.list().await.unwrap())["vm-1"],
        vms[0].instance_id.to_string()
    );
}
