//! docs/protocol.md, part B over real HTTP: the `/api/v1` agent and admin routes and the OpenAPI
//! document generated from them.

use std::time::Duration;

use lablink_testkit::{crd_command, expect_error, json_of, start_host, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn the_openapi_document_covers_every_v1_route_and_each_documented_route_exists() {
    let s = TestServer::start().await;
    let (status, doc) = json_of(
        s.client
            .get(s.url("/api/v1/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/v1/vms/{hostname}/ready", "post"),
        ("/api/v1/vms/{hostname}/assignment", "get"),
        ("/api/v1/vms/{hostname}/heartbeat", "post"),
        ("/api/v1/vms/{hostname}/telemetry", "post"),
        ("/api/v1/requests", "post"),
        ("/api/v1/vms", "get"),
        ("/api/v1/vms/{hostname}", "get"),
        ("/api/v1/vms/{hostname}/logs", "get"),
        ("/api/v1/vms/{hostname}/reboot", "post"),
        ("/api/v1/vms/{hostname}/release", "post"),
        ("/api/v1/launch", "post"),
        ("/api/v1/destroy", "post"),
        ("/api/v1/operations", "get"),
        ("/api/v1/operations/{id}", "get"),
        ("/api/v1/pool", "get"),
        ("/api/v1/openapi.json", "get"),
    ] {
        assert!(
            paths[path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    let wait = &paths["/api/v1/vms/{hostname}/assignment"]["get"];
    assert!(wait["responses"]["204"].is_object());
    assert!(wait["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "timeout"));
    assert!(doc["components"]["securitySchemes"]["agent_token"].is_object());
    // Every documented path is served (no "no such route" 404).
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{hostname}", "lablink-vm-1")
                .replace("{id}", "00000000-0000-0000-0000-000000000000");
            let r = s
                .client
                .request(
                    method.to_uppercase().parse::<Method>().unwrap(),
                    s.url(&concrete),
                )
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            let text = r.text().await.unwrap();
            assert!(
                !text.contains("no such route") && !text.contains("method not allowed"),
                "{method} {path} is not served"
            );
        }
    }
}

#[tokio::test]
async fn an_agent_registers_waits_gets_its_assignment_and_reports_in_one_call() {
    let s = TestServer::start().await;
    let hosts = s.launch(2).await;
    let (h, other) = (&hosts[0], &hosts[1]);
    let token = s.token(h);
    let (st, vm) = json_of(
        s.client
            .post(s.url(&format!("/api/v1/vms/{h}/ready")))
            .bearer_auth(&token)
            .json(&json!({"boot_id": "boot-1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{vm}");
    assert_eq!(vm["state"], "available");
    let wait = |timeout: &str| {
        s.client
            .get(s.url(&format!("/api/v1/vms/{h}/assignment?timeout={timeout}")))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(wait("0.2").await.unwrap().status(), StatusCode::NO_CONTENT);
    expect_error(wait("soon").await.unwrap(), 400).await;
    expect_error(
        s.client
            .get(s.url(&format!("/api/v1/vms/{other}/assignment")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;

    let held = tokio::spawn(wait("30"));
    let (st, granted) = json_of(
        s.client
            .post(s.url("/api/v1/requests"))
            .json(&json!({"email": "ada@lab.org", "crd_command": crd_command("4/v1code")}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{granted}");
    assert_eq!(granted["hostname"], h.as_str());
    assert_eq!(granted["newly_assigned"], true);
    let (st, assignment) = json_of(held.await.unwrap().unwrap()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(assignment["code"], "4/v1code");
    assert_eq!(assignment["command"], start_host("4/v1code", h));
    assert!(assignment["pin"].is_string());
    assert_eq!(assignment["pin"], granted["pin"]);

    let batch = json!({"gpu_health": "Healthy", "in_use": true, "status": "running", "boot_id": "boot-2",
        "timings": {"cloud_init_start": "2026-01-01T00:00:00Z", "cloud_init_end": "2026-01-01T00:01:00Z"},
        "logs": [{"stream": "container", "lines": ["ready"]}, {"stream": "agent", "lines": ["waiting", "assigned"]}]});
    let (st, vm) = json_of(
        s.client
            .post(s.url(&format!("/api/v1/vms/{h}/telemetry")))
            .bearer_auth(&token)
            .json(&batch)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{vm}");
    assert_eq!(
        (
            vm["gpu_health"].as_str(),
            vm["in_use"].as_bool(),
            vm["restarts"].as_u64()
        ),
        (Some("Healthy"), Some(true), Some(1))
    );
    let (_, logs) = json_of(
        s.client
            .get(s.url(&format!("/api/v1/vms/{h}/logs")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (logs["container"].as_str(), logs["agent"].as_str()),
        (Some("ready"), Some("waiting\nassigned"))
    );
    let (st, _) = json_of(
        s.client
            .post(s.url(&format!("/api/v1/vms/{h}/heartbeat")))
            .bearer_auth(&token)
            .json(&json!({"boot_id": "boot-2"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    for bad in [
        json!({"gpu_health": "Great"}),
        json!({"logs": [{"stream": "kernel", "lines": []}]}),
        json!({"in_use": "yes"}),
    ] {
        expect_error(
            s.client
                .post(s.url(&format!("/api/v1/vms/{h}/telemetry")))
                .bearer_auth(&token)
                .json(&bad)
                .send()
                .await
                .unwrap(),
            400,
        )
        .await;
    }
    expect_error(
        s.client
            .post(s.url(&format!("/api/v1/vms/{other}/telemetry")))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    expect_error(
        s.client
            .get(s.url(&format!("/api/v1/vms/{other}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
}

#[tokio::test]
async fn admins_launch_release_reboot_destroy_and_follow_operations() {
    let s = TestServer::start().await;
    let (st, op) = json_of(
        s.admin(Method::POST, "/api/v1/launch")
            .json(&json!({"count": 2}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{op}");
    let id = op["id"].as_str().unwrap().to_owned();
    lablink::AllocatorExt::wait_for_operation(
        &*s.allocator,
        id.parse().unwrap(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let (_, op) = json_of(
        s.admin(Method::GET, &format!("/api/v1/operations/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (
            op["status"].as_str(),
            op["done"].as_u64(),
            op["total"].as_u64()
        ),
        (Some("succeeded"), Some(2), Some(2))
    );
    let (_, ops) = json_of(
        s.admin(Method::GET, "/api/v1/operations?limit=5")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ops.as_array().unwrap().len(), 1);
    expect_error(
        s.admin(Method::GET, "/api/v1/operations/not-a-uuid")
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    expect_error(
        s.admin(Method::POST, "/api/v1/launch")
            .json(&json!({"count": "two"}))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    expect_error(
        s.admin(Method::POST, "/api/v1/launch")
            .json(&json!({"count": 0}))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;

    for h in ["lablink-vm-1", "lablink-vm-2"] {
        s.vm_post(
            h,
            "/api/vm-status",
            json!({"hostname": h, "status": "running"}),
        )
        .send()
        .await
        .unwrap();
    }
    s.request_vm("ada@lab.org", "4/x").await;
    let (_, vms) = json_of(s.admin(Method::GET, "/api/v1/vms").send().await.unwrap()).await;
    assert_eq!(vms.as_array().unwrap().len(), 2);
    let (st, vm) = json_of(
        s.admin(Method::POST, "/api/v1/vms/lablink-vm-1/release")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, vm["state"].as_str()),
        (StatusCode::OK, Some("available"))
    );
    let (_, pool) = json_of(s.admin(Method::GET, "/api/v1/pool").send().await.unwrap()).await;
    assert_eq!(pool["counts"]["assignable"], 2);
    let (st, _) = json_of(
        s.admin(Method::POST, "/api/v1/vms/lablink-vm-2/reboot")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    expect_error(
        s.admin(Method::POST, "/api/v1/vms/ghost-1/reboot")
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    expect_error(
        s.admin(Method::POST, "/api/v1/destroy")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let destroyed = loop {
        let r = s
            .admin(Method::POST, "/api/v1/destroy")
            .json(&json!({"hostnames": ["lablink-vm-1"]}))
            .send()
            .await
            .unwrap();
        if r.status() != StatusCode::CONFLICT || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(destroyed.status(), StatusCode::ACCEPTED);
}
