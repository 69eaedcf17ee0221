//! The invariants checked after the soak, through the API and in the database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::Client;
use serde_json::Value;

#[allow(unused_imports)]
use crate::*;

/// A VM in the database: hostname, state, resume, email, CRD command.
pub type VmRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

#[allow(clippy::too_many_arguments)]
pub async fn check_invariants(
    http: &Client,
    db: &crate::Database,
    dir: &Path,
    replicas: &Replicas,
    record: &Record,
    starts: &Path,
    answers: &[Answer],
    paused: &Mutex<Option<Pause>>,
    failed_vms: &Mutex<Vec<String>>,
) -> Result<bool, Error> {
    println!("\n  invariants:");
    let mut ok = true;
    let mut check = |name: &str, good: bool, detail: String| {
        println!(
            "  - {name}: {detail} [{}]",
            if good { "ok" } else { "FAILED" }
        );
        ok &= good;
    };
    let mut conn = db.connect().await?;
    let rows: Vec<VmRow> = sqlx::query_as(
        "SELECT hostname, state, resume, email, crd_command FROM lablink_vms ORDER BY hostname",
    )
    .fetch_all(&mut conn)
    .await?;

    // No VM with two owners (over the whole run, as the participants saw it).
    let two = record.two_owners.load(Ordering::Relaxed);
    check(
        "no VM with two owners",
        two == 0,
        format!(
            "{} answers; {two} answered a VM another participant held",
            answers.len()
        ),
    );

    // No email with two VMs (in the database).
    let mut by_email: HashMap<&str, usize> = HashMap::new();
    for (_, _, _, email, _) in &rows {
        if let Some(e) = email {
            *by_email.entry(e.as_str()).or_default() += 1;
        }
    }
    let doubled = by_email.values().filter(|n| **n > 1).count();
    check(
        "no email with two VMs",
        doubled == 0,
        format!(
            "{} emails hold a VM in the database; {doubled} hold more than one",
            by_email.len()
        ),
    );

    // No lost assignment: the database holds exactly what the participants hold.
    let holding = record.holding.lock().unwrap().clone();
    let db_assigned: HashMap<&str, (&str, &str)> = rows
        .iter()
        .filter_map(|(h, _, _, email, cmd)| {
            Some((
                email.as_deref()?,
                (h.as_str(), cmd.as_deref().unwrap_or("")),
            ))
        })
        .collect();
    let lost = holding
        .iter()
        .filter(|(email, (h, code))| {
            db_assigned
                .get(email.as_str())
                .is_none_or(|(dh, stored)| dh != h || stored != code)
        })
        .count();
    let unknown = db_assigned
        .keys()
        .filter(|email| !holding.contains_key(**email))
        .count();
    check(
        "no lost assignment (database)",
        lost == 0 && unknown == 0,
        format!(
            "{} participants hold a VM at the end; {lost} of them not so in the database; {unknown} assignments in the database nobody was answered",
            holding.len()
        ),
    );

    // The API of each replica says the same.
    for base in &replicas.bases {
        let vms: Vec<Value> = http
            .get(format!("{base}/api/v1/vms"))
            .basic_auth("admin", Some(PASSWORD))
            .send()
            .await?
            .json()
            .await?;
        let api: HashMap<String, String> = vms
            .iter()
            .filter_map(|vm| {
                Some((
                    vm["assigned_to"].as_str()?.to_owned(),
                    vm["hostname"].as_str()?.to_owned(),
                ))
            })
            .collect();
        let differ = holding
            .iter()
            .filter(|(email, (h, _))| api.get(email.as_str()) != Some(h))
            .count()
            + api.keys().filter(|e| !holding.contains_key(*e)).count();
        check(
            &format!("no lost assignment (API of {base})"),
            differ == 0,
            format!(
                "{} VMs assigned; {differ} differ from what participants hold",
                api.len()
            ),
        );
    }

    // Every agent that was assigned saw it: simulated agents recorded the code, real ones ran
    // start-host with it.
    let mut seen: HashMap<String, String> = record
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(code, (h, _))| (code.clone(), h.clone()))
        .collect();
    let started = std::fs::read_to_string(starts).unwrap_or_default();
    let mut real_runs = 0;
    for line in started.lines() {
        let arg = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
        };
        if let (Some(code), Some(name)) = (arg("--code="), arg("--name=")) {
            real_runs += 1;
            seen.insert(code, name);
        }
    }
    let paused = paused.lock().unwrap().clone();
    let released = record.released.lock().unwrap().clone();
    let mut missed = 0;
    let mut excused = 0;
    for a in answers {
        if seen.get(&a.code) == Some(&a.hostname) {
            continue;
        }
        // Assigned to the paused agent before its lease ran out, and released before the
        // agent could look again (it resumes at SIGCONT and re-checks within RECHECK s):
        // nobody can see that. An assignment it could have seen is not excused.
        let unseeable = paused.as_ref().is_some_and(|p| {
            p.hostname == a.hostname
                && a.at >= p.stopped
                && p.unhealthy.is_some_and(|u| a.sent < u)
                && released
                    .get(&a.code)
                    .is_some_and(|r| *r <= p.resumed + Duration::from_secs(RECHECK))
        });
        if unseeable {
            excused += 1;
            continue;
        }
        missed += 1;
        if missed <= 5 {
            println!("    not seen by its agent: {} code {}", a.hostname, a.code);
        }
    }
    check(
        "every assigned agent saw its assignment",
        missed == 0,
        format!(
            "{} assignments; {real_runs} start-host runs by real agents; {missed} never seen{}",
            answers.len(),
            if excused > 0 {
                format!(" ({excused} to the paused agent before its lease ran out, released before it resumed)")
            } else {
                String::new()
            }
        ),
    );

    // The paused agent's VM was offered to nobody while it was unhealthy: no request sent
    // after the generator saw it unhealthy and answered before SIGCONT named it.
    match &paused {
        Some(Pause {
            hostname,
            unhealthy: Some(unhealthy),
            resumed,
            ..
        }) => {
            let offered = answers
                .iter()
                .filter(|a| &a.hostname == hostname && a.sent >= *unhealthy && a.at <= *resumed)
                .count();
            check(
                "the paused agent's VM was offered to nobody while unhealthy",
                offered == 0,
                format!(
                    "unhealthy for {:.1} s before SIGCONT; {offered} answers named {hostname} meanwhile",
                    (*resumed - *unhealthy).as_secs_f64()
                ),
            );
        }
        _ => check(
            "the paused agent's VM was offered to nobody while unhealthy",
            false,
            "the pause fault did not run or its VM never became unhealthy".into(),
        ),
    }

    // No orphaned VM: every machine in the cloud has a live record, and every live record a
    // machine.
    let machines: HashSet<String> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    let live =
        |state: &str| !matches!(state, "failed" | "terminated" | "terminating" | "requested");
    let recorded: HashSet<&str> = rows
        .iter()
        .filter(|(_, state, _, _, _)| live(state))
        .map(|(h, _, _, _, _)| h.as_str())
        .collect();
    let orphans = machines
        .iter()
        .filter(|m| !recorded.contains(m.as_str()))
        .count();
    let lost_machines = recorded.iter().filter(|h| !machines.contains(**h)).count();
    check(
        "no orphaned VM in the provisioner's inventory",
        orphans == 0 && lost_machines == 0,
        format!(
            "{} machines, {} live records; {orphans} machines without a record, {lost_machines} records without a machine",
            machines.len(),
            recorded.len()
        ),
    );

    // VMs whose launch failed were never handed out.
    let failed_vms = failed_vms.lock().unwrap().clone();
    let handed = answers
        .iter()
        .filter(|a| failed_vms.contains(&a.hostname))
        .count();
    check(
        "no failed VM assigned",
        handed == 0,
        format!(
            "{} failed VMs; {handed} answers named one",
            failed_vms.len()
        ),
    );
    let states: BTreeMap<String, usize> = rows.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(match &r.2 {
            Some(resume) => format!("{}({resume})", r.1),
            None => r.1.clone(),
        })
        .or_default() += 1;
        m
    });
    println!("  VM states at the end: {states:?}");
    Ok(ok)
}
