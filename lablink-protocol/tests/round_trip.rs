//! Every body through serde_json: built as its sender builds it, to the exact JSON on the wire
//! (literals, so a renamed or retyped field fails here), parsed as its receiver parses it, and
//! written again unchanged.

use std::fmt::Debug;

use chrono::{DateTime, TimeZone, Utc};
use lablink_core::StartupTimings;
use lablink_protocol::{
    AssignmentBody, CollectedFile, CollectionState, CollectionStatus, CollectionTask,
    DesktopReportBody, ErrorBody, HeartbeatBody, LogBody, Manifest, ReadyBody, SkippedFile,
    TasksBody, TelemetryBody, TimingsBody, TunnelBody, WaitQuery, WarningTask,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

fn at(h: u32, m: u32, s: u32, micros: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, h, m, s).unwrap()
        + chrono::Duration::microseconds(micros.into())
}

/// `sent` serializes to exactly `wire`, `wire` parses back to `sent`, and the parsed body
/// serializes to `wire` again.
#[track_caller]
fn round_trip<T>(sent: &T, wire: &str)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let json = serde_json::to_string(sent).unwrap();
    assert_eq!(json, wire, "the JSON on the wire");
    let received: T = serde_json::from_str(&json).unwrap();
    assert_eq!(&received, sent, "what the receiver parses");
    assert_eq!(
        serde_json::to_string(&received).unwrap(),
        json,
        "written again"
    );
}

/// What a receiver makes of `wire` (a form the other side may send).
#[track_caller]
fn parse<T: DeserializeOwned>(wire: Value) -> T {
    serde_json::from_value(wire).unwrap()
}

#[test]
fn the_assignment_travels_unchanged_and_never_prints_its_secrets() {
    let sent = AssignmentBody {
        hostname: "vm-1".into(),
        command: "DISPLAY= /opt/google/chrome-remote-desktop/start-host --code=\"4/0Ab\" \
                  --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\" --name=vm-1"
            .into(),
        code: "4/0Ab".into(),
        pin: "123456".into(),
        assigned_at: at(10, 20, 30, 987_000),
        mode: "crd".into(),
        attempt: 2,
        version: "1767349230987000.2-assigned".into(),
        tunnel: None,
    };
    round_trip(
        &sent,
        r#"{"hostname":"vm-1","command":"DISPLAY= /opt/google/chrome-remote-desktop/start-host --code=\"4/0Ab\" --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\" --name=vm-1","code":"4/0Ab","pin":"123456","assigned_at":"2026-01-02T10:20:30.987Z","mode":"crd","attempt":2,"version":"1767349230987000.2-assigned"}"#,
    );
    // An allocator from before attempts and the browser desktop: its assignment is the
    // first attempt of a Chrome Remote Desktop session, with no version to wait on.
    let old: AssignmentBody = parse(serde_json::json!({
        "hostname": "vm-1", "command": "x", "code": "4/0Ab", "pin": "123456",
        "assigned_at": "2026-01-02T10:20:30.987Z",
    }));
    assert_eq!(
        (
            old.mode.as_str(),
            old.attempt,
            old.version.as_str(),
            old.tunnel
        ),
        ("crd", 1, "", None)
    );
    // A browser desktop's, with the tunnel a browser asked for.
    let browser = AssignmentBody {
        command: String::new(),
        code: String::new(),
        mode: "browser".into(),
        tunnel: Some(TunnelBody {
            id: "7d5c".into(),
            url: "/api/v1/vms/vm-1/tunnel/7d5c".into(),
        }),
        ..sent.clone()
    };
    let wire = serde_json::to_value(&browser).unwrap();
    assert_eq!(wire["tunnel"]["url"], "/api/v1/vms/vm-1/tunnel/7d5c");
    assert_eq!(parse::<AssignmentBody>(wire), browser);
    let shown = format!("{sent:?}");
    assert!(
        !shown.contains("4/0Ab") && !shown.contains("123456") && !shown.contains("start-host"),
        "{shown}"
    );
    assert!(shown.contains("vm-1"), "{shown}");
}

#[test]
fn telemetry_with_timings_and_logs_travels_unchanged() {
    // As the agent's main loop builds it once the VM is running.
    let sent = TelemetryBody {
        gpu_health: Some("Healthy".into()),
        in_use: Some(false),
        status: Some("running".into()),
        boot_id: Some("boot-1".into()),
        timings: Some(TimingsBody {
            container_start: Some(at(10, 0, 0, 0)),
            container_end: Some(at(10, 0, 5, 250_000)),
            container_startup_duration_seconds: Some(5.25),
            ..Default::default()
        }),
        logs: vec![
            LogBody {
                stream: "agent".into(),
                lines: vec!["2026-01-02T10:00:05.250000Z agent running".into()],
            },
            LogBody {
                stream: "container".into(),
                lines: vec!["a".into(), "b".into()],
            },
        ],
        desktop: None,
    };
    round_trip(
        &sent,
        r#"{"gpu_health":"Healthy","in_use":false,"status":"running","boot_id":"boot-1","timings":{"container_start":"2026-01-02T10:00:00.000000Z","container_end":"2026-01-02T10:00:05.250000Z","container_startup_duration_seconds":5.25},"logs":[{"stream":"agent","lines":["2026-01-02T10:00:05.250000Z agent running"]},{"stream":"container","lines":["a","b"]}]}"#,
    );
    // Every field, as a VM's own scripts may send them.
    let all = TimingsBody {
        cloud_init_start: Some(at(9, 0, 0, 1)),
        cloud_init_end: Some(at(9, 1, 0, 0)),
        container_start: Some(at(9, 2, 0, 0)),
        container_end: Some(at(9, 3, 0, 0)),
        cloud_init_duration_seconds: Some(60.0),
        container_startup_duration_seconds: Some(60.5),
    };
    round_trip(
        &all,
        r#"{"cloud_init_start":"2026-01-02T09:00:00.000001Z","cloud_init_end":"2026-01-02T09:01:00.000000Z","container_start":"2026-01-02T09:02:00.000000Z","container_end":"2026-01-02T09:03:00.000000Z","cloud_init_duration_seconds":60.0,"container_startup_duration_seconds":60.5}"#,
    );
}

#[test]
fn absent_telemetry_is_not_sent_and_the_allocator_takes_null_and_other_time_forms() {
    round_trip(&TelemetryBody::default(), "{}");
    round_trip(
        &TelemetryBody {
            boot_id: Some("b".into()),
            ..Default::default()
        },
        r#"{"boot_id":"b"}"#,
    );
    let parsed: TelemetryBody = parse(json!({
        "gpu_health": null, "in_use": true, "status": null, "boot_id": null,
        "timings": {"container_start": "2026-01-02T12:00:00+02:00", "cloud_init_end": null},
    }));
    assert_eq!(
        parsed,
        TelemetryBody {
            in_use: Some(true),
            timings: Some(TimingsBody {
                container_start: Some(at(10, 0, 0, 0)),
                ..Default::default()
            }),
            ..Default::default()
        }
    );
}

#[test]
fn timings_convert_to_and_from_the_domain_type() {
    let body = TimingsBody {
        cloud_init_start: Some(at(9, 0, 0, 0)),
        cloud_init_end: Some(at(9, 1, 0, 0)),
        container_start: Some(at(9, 2, 0, 0)),
        container_end: Some(at(9, 3, 0, 0)),
        cloud_init_duration_seconds: Some(60.0),
        container_startup_duration_seconds: Some(60.5),
    };
    let domain = StartupTimings::from(body.clone());
    assert_eq!(
        domain.provision_start, None,
        "the VM does not report provisioning"
    );
    assert_eq!(domain.container_startup_duration_seconds, Some(60.5));
    assert_eq!(TimingsBody::from(&domain), body);
}

#[test]
fn ready_heartbeat_and_the_wait_query_travel_unchanged() {
    round_trip(
        &ReadyBody {
            status: Some("initializing".into()),
            boot_id: Some("boot-1".into()),
        },
        r#"{"status":"initializing","boot_id":"boot-1"}"#,
    );
    round_trip(&ReadyBody::default(), "{}");
    round_trip(
        &HeartbeatBody {
            boot_id: "boot-2".into(),
        },
        r#"{"boot_id":"boot-2"}"#,
    );
    round_trip(
        &WaitQuery {
            timeout: Some(29.5),
            seen: None,
        },
        r#"{"timeout":29.5}"#,
    );
    round_trip(
        &WaitQuery {
            timeout: Some(30.0),
            seen: Some("1767349230987000.1-failed".into()),
        },
        r#"{"timeout":30.0,"seen":"1767349230987000.1-failed"}"#,
    );
    // How starting the desktop went, as the agent reports it.
    round_trip(
        &TelemetryBody {
            desktop: Some(DesktopReportBody {
                attempt: 1,
                stage: "failed".into(),
                failure: Some("code_rejected".into()),
                exit_status: Some(1),
            }),
            ..Default::default()
        },
        r#"{"desktop":{"attempt":1,"stage":"failed","failure":"code_rejected","exit_status":1}}"#,
    );
    round_trip(&WaitQuery::default(), "{}");
}

#[test]
fn the_collection_task_travels_unchanged() {
    let task = CollectionTask {
        id: "c-0192".into(),
        roots: vec!["~".into(), "/srv/{hostname}/work".into()],
        patterns: vec!["**/*.slp".into()],
        max_bytes: 1 << 30,
    };
    round_trip(
        &task,
        r#"{"id":"c-0192","roots":["~","/srv/{hostname}/work"],"patterns":["**/*.slp"],"max_bytes":1073741824}"#,
    );
    round_trip(
        &TasksBody {
            collection: Some(task),
            ..Default::default()
        },
        r#"{"collection":{"id":"c-0192","roots":["~","/srv/{hostname}/work"],"patterns":["**/*.slp"],"max_bytes":1073741824}}"#,
    );
    round_trip(&TasksBody::default(), r#"{"collection":null}"#);
    round_trip(
        &TasksBody {
            reboot: true,
            ..Default::default()
        },
        r#"{"collection":null,"reboot":true}"#,
    );
    let parsed: TasksBody = parse(json!({}));
    assert_eq!(parsed.collection, None);
    assert!(!parsed.reboot);
    assert!(parsed.warnings.is_empty());
}

#[test]
fn a_warning_travels_unchanged_and_only_when_there_is_one() {
    let warning = WarningTask {
        id: "5f0c1a4e-8a8e-4d3b-9a55-0d6c2f1b7e21".into(),
        kind: "destruction".into(),
        at: "2026-12-06T17:00:00Z".parse().unwrap(),
        title: "LabLink: this VM will be destroyed".into(),
        message: "This VM will be destroyed at 17:00 UTC.".into(),
    };
    round_trip(
        &TasksBody {
            warnings: vec![warning],
            ..Default::default()
        },
        r#"{"collection":null,"warnings":[{"id":"5f0c1a4e-8a8e-4d3b-9a55-0d6c2f1b7e21","kind":"destruction","at":"2026-12-06T17:00:00Z","title":"LabLink: this VM will be destroyed","message":"This VM will be destroyed at 17:00 UTC."}]}"#,
    );
}

#[test]
fn the_manifest_travels_unchanged() {
    let manifest = Manifest {
        collection: "c-0192".into(),
        files: vec![CollectedFile {
            path: "work/labels.slp".into(),
            size: 4,
            sha256: "03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4".into(),
        }],
        skipped: vec![SkippedFile {
            path: "/home/ada/link.slp".into(),
            reason: "a symbolic link; links are not followed".into(),
        }],
    };
    round_trip(
        &manifest,
        r#"{"collection":"c-0192","files":[{"path":"work/labels.slp","size":4,"sha256":"03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4"}],"skipped":[{"path":"/home/ada/link.slp","reason":"a symbolic link; links are not followed"}]}"#,
    );
    // The allocator takes a manifest without `skipped`.
    let parsed: Manifest = parse(json!({"collection": "c", "files": []}));
    assert_eq!(
        parsed,
        Manifest {
            collection: "c".into(),
            files: vec![],
            skipped: vec![],
        }
    );
}

#[test]
fn the_upload_answer_and_errors_travel_unchanged() {
    let status = CollectionStatus {
        hostname: "vm-1".into(),
        id: "c-0192".into(),
        state: CollectionState::Complete,
        requested_at: at(10, 0, 0, 0),
        updated_at: at(10, 5, 0, 500_000),
        attempts: 1,
        error: None,
        files: 2,
        bytes: 6,
        skipped: 1,
    };
    round_trip(
        &status,
        r#"{"hostname":"vm-1","id":"c-0192","state":"complete","requested_at":"2026-01-02T10:00:00Z","updated_at":"2026-01-02T10:05:00.500Z","attempts":1,"error":null,"files":2,"bytes":6,"skipped":1}"#,
    );
    for (state, wire) in [
        (CollectionState::Requested, "\"requested\""),
        (CollectionState::Uploading, "\"uploading\""),
        (CollectionState::Complete, "\"complete\""),
        (CollectionState::Failed, "\"failed\""),
    ] {
        round_trip(&state, wire);
        assert_eq!(
            state.is_pending(),
            matches!(
                state,
                CollectionState::Requested | CollectionState::Uploading
            )
        );
    }
    round_trip(
        &ErrorBody {
            error: "VM not found.".into(),
        },
        r#"{"error":"VM not found."}"#,
    );
}
