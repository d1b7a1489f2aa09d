//! The proxy's own counters (`--metrics-listen`, `GET /metrics`), scraped
//! now and then during the run, and compared with the books at the end.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One scrape: every sample, keyed by its name and labels as written
/// (`spillway_bytes_total{direction="up"}`).
pub struct Scrape {
    samples: HashMap<String, f64>,
}

impl Scrape {
    pub fn get(addr: SocketAddr) -> Result<Scrape, String> {
        let timeout = Duration::from_secs(5);
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("send: {e}"))?;
        let mut text = String::new();
        s.read_to_string(&mut text)
            .map_err(|e| format!("read: {e}"))?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of head")?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("answered {:?}", head.lines().next()));
        }
        let mut samples = HashMap::new();
        for line in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line
                .rsplit_once(' ')
                .ok_or(format!("a sample without a value: {line:?}"))?;
            let value: f64 = value.parse().map_err(|e| format!("{line:?}: {e}"))?;
            samples.insert(key.to_string(), value);
        }
        Ok(Scrape { samples })
    }

    /// The sample `key`, exactly as written; 0 if absent is not assumed:
    /// a missing sample is an error the caller reports.
    pub fn value(&self, key: &str) -> Result<u64, String> {
        self.samples
            .get(key)
            .map(|v| *v as u64)
            .ok_or(format!("no sample {key}"))
    }

    /// Counters (and histogram counts) that went down since `before`:
    /// a counter only ever grows.
    pub fn decreased_since(&self, before: &Scrape) -> Vec<String> {
        self.samples
            .iter()
            .filter(|(k, _)| {
                let name = k.split('{').next().unwrap_or("");
                name.ends_with("_total") || name.ends_with("_count") || name.ends_with("_bucket")
            })
            .filter_map(|(k, v)| {
                let old = before.samples.get(k)?;
                (v < old).then(|| format!("{k} went from {old} to {v}"))
            })
            .collect()
    }
}

/// The proxy's counters, scraped with the proxy idle after the run,
/// against the books (every connection checked), the log and the
/// backends' own counts. Returns what disagrees.
pub fn compare(
    scrape: &Scrape,
    f: &crate::books::Figures,
    stats: &crate::log::LogStats,
    backends: &[std::sync::Arc<crate::backend::Backend>],
    anonymous: &[u64],
    max_disk: u64,
) -> Vec<String> {
    use crate::backend::Kind;
    use std::sync::atomic::Ordering;
    let mut bad = Vec::new();
    let mut same = |key: &str, ours: u64, what: &str| match scrape.value(key) {
        Ok(v) if v == ours => {}
        Ok(v) => bad.push(format!("metrics: {key} is {v}, but {what} is {ours}")),
        Err(e) => bad.push(format!("metrics: {e}")),
    };
    same(
        "spillway_connections_open",
        0,
        "what is open once every client is done",
    );
    for (i, outcome) in crate::books::OUTCOMES.iter().enumerate() {
        same(
            &format!("spillway_connections_closed_total{{outcome=\"{outcome}\"}}"),
            f.outcomes[i],
            "the number of close lines with such a reason",
        );
    }
    same(
        "spillway_client_seconds_count",
        stats.closes,
        "the number of close lines",
    );
    same(
        "spillway_bytes_total{direction=\"up\"}",
        f.up_bytes,
        "the close lines' sum of up_bytes",
    );
    same(
        "spillway_bytes_total{direction=\"down\"}",
        f.down_bytes,
        "the close lines' sum of down_bytes",
    );
    same(
        "spillway_spilled_bytes_total{direction=\"up\"}",
        f.up_spilled,
        "the close lines' sum of up_spilled",
    );
    same(
        "spillway_spilled_bytes_total{direction=\"down\"}",
        f.down_spilled,
        "the close lines' sum of down_spilled",
    );
    same(
        "spillway_spill_events_total{direction=\"up\"}",
        f.spilled_up_conns,
        "connections with up_spilled > 0",
    );
    same(
        "spillway_spill_events_total{direction=\"down\"}",
        f.spilled_down_conns,
        "connections with down_spilled > 0",
    );
    same("spillway_memory_bytes", 0, "what an idle proxy should hold");
    same("spillway_disk_bytes", 0, "what an idle proxy should hold");
    same("spillway_disk_limit_bytes", max_disk, "--max-disk");
    // Each WARN is a connection's first episode; the counters count them all.
    let at_least = |bad: &mut Vec<String>, key: &str, ours: u64, what: &str| match scrape.value(key)
    {
        Ok(v) if v >= ours => {}
        Ok(v) => bad.push(format!(
            "metrics: {key} is {v}, fewer than the {ours} {what}"
        )),
        Err(e) => bad.push(format!("metrics: {e}")),
    };
    at_least(
        &mut bad,
        "spillway_backpressure_events_total{cause=\"max_disk\"}",
        stats.max_disk,
        "\"--max-disk reached\" WARNs",
    );
    at_least(
        &mut bad,
        "spillway_backpressure_events_total{cause=\"disk_error\"}",
        stats.disk_full,
        "\"No space left\" WARNs",
    );
    for b in backends {
        let label = format!("backend=\"{}\"", b.addr);
        let accepted = b.accepted.load(Ordering::Relaxed);
        let refused_logged = stats.refused_by.get(&b.addr).copied().unwrap_or(0);
        match scrape.value(&format!(
            "spillway_backend_connect_failures_total{{{label},cause=\"refused\"}}"
        )) {
            Ok(v) if v == refused_logged => {}
            Ok(v) => bad.push(format!(
                "metrics: {} ({}) refused {v} connects by the counter, {refused_logged} by the log",
                b.addr,
                b.kind.name()
            )),
            Err(e) => bad.push(format!("metrics: {e}")),
        }
        // Every connection a backend accepted and got a hello on was a
        // connect that succeeded (or, on a stalled machine, one that timed
        // out just before). One without a hello may be a connect the proxy
        // never decided (the client left first); and a connect can succeed
        // and never be accepted (a listener that went down with it in its
        // backlog).
        let accepted = accepted.saturating_sub(anonymous.get(b.index).copied().unwrap_or(0));
        let connects = scrape.value(&format!("spillway_backend_connects_total{{{label}}}"));
        let timeouts = scrape
            .value(&format!(
                "spillway_backend_connect_failures_total{{{label},cause=\"timeout\"}}"
            ))
            .unwrap_or(0);
        match connects {
            Ok(0) if b.kind == Kind::Refuser => {}
            Ok(v) if b.kind == Kind::Refuser => {
                bad.push(format!("metrics: {v} connects to {}, which refuses every one", b.addr))
            }
            Ok(v) if accepted <= v + timeouts => {}
            Ok(v) => bad.push(format!(
                "metrics: {} ({}) got a hello on {accepted} connections, but the proxy counts {v} connects to it",
                b.addr,
                b.kind.name()
            )),
            Err(e) => bad.push(format!("metrics: {e}")),
        }
        match scrape.value(&format!("spillway_backend_active{{{label}}}")) {
            Ok(0) => {}
            Ok(v) => bad.push(format!(
                "metrics: {v} connections still hold {} when none is open",
                b.addr
            )),
            Err(e) => bad.push(format!("metrics: {e}")),
        }
    }
    bad
}
