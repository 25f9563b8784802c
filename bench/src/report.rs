//! The markdown table, and the targets against it.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::load::Pace;
use crate::rows::{Row, RowKind, Run};

/// `12345.6` -> `12,346`.
pub fn thousands(x: f64) -> String {
    let n = x.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Microseconds as milliseconds.
fn ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn p(h: &Histogram<u64>, q: f64) -> u64 {
    h.value_at_quantile(q)
}

/// The flat-out baseline runs: before the other rows, and again after ingest's.
fn baselines(rows: &[Row]) -> impl Iterator<Item = &Row> {
    rows.iter()
        .filter(|r| r.kind == RowKind::Baseline && matches!(r.run, Run::Max | Run::Again) && r.pace == Pace::FlatOut)
}

/// What the ratios divide by: the mean of the flat-out baseline runs.
fn baseline_rate(rows: &[Row]) -> Option<f64> {
    let rates: Vec<f64> = baselines(rows).map(|r| r.load.rate()).collect();
    (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
}

/// The baseline's saturated run (`Run::Saturated`), if there was one.
fn saturated_baseline(rows: &[Row]) -> Option<&Row> {
    rows.iter()
        .find(|r| r.kind == RowKind::Baseline && r.run == Run::Saturated)
}

pub fn table(rows: &[Row]) -> String {
    let base = baseline_rate(rows);
    let saturated_base = saturated_baseline(rows).map(|r| r.load.rate());
    let mut out = String::new();
    out.push_str(
        "| row | load | events | req/s | delivered ev/s | ack p50 | ack p99 | ack p99.9 | ack max \
         | e2e p50 | e2e p99 | peak RSS | idle RSS | ready | vs baseline | CPU server / bench / other | lost |\n",
    );
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    let dash = || "–".to_string();
    for r in rows {
        let load = match r.pace {
            Pace::FlatOut => format!("flat out, C={}", r.connections),
            Pace::Rate(rate) => format!("{}/s, C={}", thousands(rate), r.connections),
        };
        let ratio = match (base, saturated_base, r.run) {
            (Some(b), _, Run::Max | Run::Again) if b > 0.0 => format!("{:.2}", r.load.rate() / b),
            (_, Some(b), Run::Saturated) if b > 0.0 => format!("{:.2}", r.load.rate() / b),
            _ => dash(),
        };
        let (delivered, e2e50, e2e99) = match &r.delivered {
            Some(d) => (thousands(d.rate), ms(p(&d.e2e_us, 0.5)), ms(p(&d.e2e_us, 0.99))),
            None => (dash(), dash(), dash()),
        };
        let lost = r.missing_in_store as u64 + r.delivered.as_ref().map_or(0, |d| d.missing);
        let h = &r.load.ack_us;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} / {:.2} / {:.2} | {} |",
            r.label(),
            load,
            thousands(r.load.answered as f64),
            thousands(r.load.rate()),
            delivered,
            ms(p(h, 0.5)),
            ms(p(h, 0.99)),
            ms(p(h, 0.999)),
            ms(h.max()),
            e2e50,
            e2e99,
            mib(r.server.peak_rss),
            r.server.idle_rss.map_or_else(dash, mib),
            r.server.ready.map_or_else(dash, |d| format!("{} ms", d.as_millis())),
            ratio,
            r.server.cpu_cores,
            r.bench_cpu_cores,
            r.other_cpu_cores,
            lost,
        );
    }
    let stalled: Vec<String> = rows
        .iter()
        .filter(|r| r.stalls.count > 0)
        .map(|r| format!("{} {}", r.label(), stalls(&r.stalls)))
        .collect();
    if !stalled.is_empty() {
        let _ = writeln!(
            out,
            "\nThe machine stood still (a bench thread asleep 1 ms at a time woke {} ms or more late): {}.",
            crate::proc::STALL.as_millis(),
            stalled.join("; ")
        );
    }
    let late: Vec<String> = rows
        .iter()
        .filter(|r| matches!(r.pace, Pace::Rate(_)))
        .map(|r| format!("{} {} ms", r.label(), ms(p(&r.load.late_us, 0.99))))
        .collect();
    if !late.is_empty() {
        let _ = writeln!(
            out,
            "\nOpen loop, how late the generator sent (p99, part of ack latency): {}.",
            late.join(", ")
        );
    }
    out.push_str("\nLatencies in ms. ack: request sent (in open loop: scheduled) to response. e2e: request sent to the sink server's receipt, per delivery. delivered ev/s: acknowledged events that reached every sink, first send to last receipt (flat out, that includes delivering the backlog after sending stopped). sustained: the fastest of the open-loop runs tried at which that was 97 % of the rate or more. saturated: flat out with four times the connections, each server's capacity; vs baseline is to the saturated baseline. CPU: cores used during the load by the server, this bench (load generator and sink server), and everything else on the machine (should be near 0).\n");
    out
}

/// `2 stalls (longest 143 ms), host steal 0.03 cores`.
pub fn stalls(s: &crate::proc::Stalls) -> String {
    let stalls = match s.count {
        0 => "no stalls".to_string(),
        1 => format!("1 stall of {} ms", s.longest.as_millis()),
        n => format!("{n} stalls (longest {} ms)", s.longest.as_millis()),
    };
    format!("{stalls}, host steal {:.2} cores", s.steal_cores)
}

/// The targets, each with what this run measured. Only rows that
/// ran are judged.
pub fn targets(rows: &[Row]) -> String {
    let find = |kind: RowKind, run: Run| rows.iter().find(|r| r.kind == kind && r.run == run);
    let mut out = String::new();
    let mut line = |target: &str, measured: String, met: bool| {
        let _ = writeln!(
            out,
            "| {target} | {measured} | {} |",
            if met { "met" } else { "**not met**" }
        );
    };
    if let (Some(b), Some(i)) = (baseline_rate(rows), find(RowKind::Ingest, Run::Max)) {
        let ratio = i.load.rate() / b.max(1.0);
        let runs: Vec<String> = baselines(rows).map(|r| thousands(r.load.rate())).collect();
        let runs = match runs.len() {
            1 => String::new(),
            _ => format!(
                ", the mean of the baseline before and after ingest: {}",
                runs.join(" and ")
            ),
        };
        let durable = find(RowKind::Durable, Run::Max)
            .map(|d| format!("; durable baseline: {} req/s", thousands(d.load.rate())))
            .unwrap_or_default();
        // Judged at the table's C; the capacities are shown beside it.
        let saturated = match (saturated_baseline(rows), find(RowKind::Ingest, Run::Saturated)) {
            (Some(sb), Some(si)) => {
                let best = |kind: RowKind| {
                    rows.iter()
                        .filter(|r| r.kind == kind && r.pace == Pace::FlatOut)
                        .filter(|r| matches!(r.run, Run::Max | Run::Again | Run::Saturated))
                        .map(|r| r.load.rate())
                        .fold(0.0, f64::max)
                };
                let (bi, bb) = (best(RowKind::Ingest), best(RowKind::Baseline));
                format!(
                    ". Saturated, C={}: {:.0}% ({} vs {} req/s); each at its best: {:.0}% ({} vs {} req/s)",
                    si.connections,
                    si.load.rate() / sb.load.rate().max(1.0) * 100.0,
                    thousands(si.load.rate()),
                    thousands(sb.load.rate()),
                    bi / bb.max(1.0) * 100.0,
                    thousands(bi),
                    thousands(bb),
                )
            }
            _ => String::new(),
        };
        line(
            "durable ingest ≥ 50% of baseline req/s",
            format!(
                "{:.0}% ({} vs {} req/s{runs}{durable}){saturated}",
                ratio * 100.0,
                thousands(i.load.rate()),
                thousands(b)
            ),
            ratio >= 0.5,
        );
    }
    if let Some(r) = find(RowKind::Ingest, Run::Half) {
        let p99 = p(&r.load.ack_us, 0.99);
        let floors: Vec<String> = [RowKind::Baseline, RowKind::Durable]
            .into_iter()
            .filter_map(|k| find(k, Run::Half))
            .map(|b| format!("{} {} ms", b.kind.name(), ms(p(&b.load.ack_us, 0.99))))
            .collect();
        let floor = match floors.is_empty() {
            true => String::new(),
            false => format!(" (at the same rate: {})", floors.join(", ")),
        };
        line(
            "p99 ack ≤ 5 ms at half of ingest's max rate",
            format!("{} ms at {}{floor}", ms(p99), r.pace),
            p99 <= 5_000,
        );
    }
    // (target, measured, met) for a row with sinks.
    let delivery = |kind: RowKind, target: &str, goal: f64| -> Option<(String, String, bool)> {
        let flat = find(kind, Run::Max).and_then(|r| Some((r, r.delivered.as_ref()?)));
        let sustained = find(kind, Run::Sustained).and_then(|r| Some((r, r.delivered.as_ref()?)));
        let flat_text = flat.map(|(r, d)| {
            format!(
                "flat out {} delivered events/s, ingest meanwhile {} req/s",
                thousands(d.rate),
                thousands(r.load.rate())
            )
        });
        match (sustained, flat) {
            (Some((r, d)), _) => {
                let kept = r.keeps_up();
                let how = match kept {
                    true => "kept up with",
                    false => "fell behind even at the lowest rate tried,",
                };
                Some((
                    target.to_string(),
                    format!(
                        "{} events/s sustained (delivery {how} {} in open loop){}",
                        thousands(d.rate),
                        r.pace,
                        flat_text.map(|f| format!("; {f}")).unwrap_or_default()
                    ),
                    kept && d.rate >= goal,
                ))
            }
            (None, Some((_, d))) => Some((
                target.to_string(),
                format!("{} (sustained rate not searched)", flat_text.unwrap_or_default()),
                d.rate >= goal,
            )),
            (None, None) => None,
        }
    };
    if let Some((target, measured, met)) = delivery(
        RowKind::EndToEnd,
        "end to end (1 http sink) ≥ 10,000 events/s sustained",
        10_000.0,
    ) {
        line(&target, measured, met);
    }
    if let Some(r) = find(RowKind::EndToEnd, Run::Half)
        && let Some(d) = &r.delivered
    {
        let p99 = p(&d.e2e_us, 0.99);
        line(
            "p99 send-to-sink ≤ 50 ms at half the e2e rate",
            format!("{} ms at {}", ms(p99), r.pace),
            p99 <= 50_000,
        );
        let ack = p(&r.load.ack_us, 0.99);
        line(
            "p99 ack ≤ 5 ms at half the e2e rate (delivery running)",
            format!("{} ms at {}", ms(ack), r.pace),
            ack <= 5_000,
        );
    }
    if let Some((target, measured, met)) = delivery(
        RowKind::FanOut,
        "fan-out to 5 sinks ≥ 4,000 events/s sustained",
        4_000.0,
    ) {
        line(&target, measured, met);
    }
    let expeditor: Vec<&Row> = rows.iter().filter(|r| r.kind.is_expeditor()).collect();
    if let Some(r) = expeditor.iter().max_by_key(|r| r.server.peak_rss) {
        line(
            "peak RSS ≤ 64 MiB under load",
            format!("{} ({})", mib(r.server.peak_rss), r.label()),
            r.server.peak_rss <= 64 << 20,
        );
    }
    if let Some(idle) = expeditor.iter().filter_map(|r| r.server.idle_rss).max() {
        line(
            "idle RSS ≤ 20 MiB",
            format!("{} (largest)", mib(idle)),
            idle <= 20 << 20,
        );
    }
    if let Some(ready) = expeditor.iter().filter_map(|r| r.server.ready).max() {
        line(
            "start to ready ≤ 200 ms",
            format!("{} ms (slowest)", ready.as_millis()),
            ready <= Duration::from_millis(200),
        );
    }
    if out.is_empty() {
        return out;
    }
    format!("| target | measured | |\n|---|---|---|\n{out}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::test_row;

    /// The ingest target's line of `targets`.
    fn ingest_line(rows: &[Row]) -> String {
        let judged = targets(rows);
        judged
            .lines()
            .find(|l| l.starts_with("| durable ingest"))
            .unwrap_or_else(|| panic!("no ingest target in {judged}"))
            .to_string()
    }

    fn rows(baselines: &[(Run, u64)], ingest: u64) -> Vec<Row> {
        let mut rows: Vec<Row> = baselines
            .iter()
            .map(|&(run, rate)| test_row(RowKind::Baseline, run, Pace::FlatOut, rate, None))
            .collect();
        rows.push(test_row(RowKind::Ingest, Run::Max, Pace::FlatOut, ingest, None));
        rows
    }

    #[test]
    fn ingest_is_judged_against_the_mean_of_the_baselines_before_and_after_it() {
        // 40,000 is 42 % of the first baseline alone, 50 % of the mean.
        let both = rows(&[(Run::Max, 96_000), (Run::Again, 64_000)], 40_000);
        assert_eq!(baseline_rate(&both), Some(80_000.0));
        assert_eq!(
            ingest_line(&both),
            "| durable ingest ≥ 50% of baseline req/s | 50% (40,000 vs 80,000 req/s, the mean of the baseline \
             before and after ingest: 96,000 and 64,000) | met |"
        );
        let table = table(&both);
        assert!(
            table.contains("| baseline after ingest | flat out, C=64 | 64,000 | 64,000 |"),
            "{table}"
        );
        assert!(table.contains("| 0.50 |"), "{table}");

        let alone = rows(&[(Run::Max, 96_000)], 40_000);
        assert_eq!(baseline_rate(&alone), Some(96_000.0));
        assert_eq!(
            ingest_line(&alone),
            "| durable ingest ≥ 50% of baseline req/s | 42% (40,000 vs 96,000 req/s) | **not met** |"
        );
    }

    #[test]
    fn saturated_runs_are_shown_beside_the_judged_ratio_not_instead_of_it() {
        let mut rows = rows(&[(Run::Max, 96_000), (Run::Again, 64_000)], 30_000);
        let mut saturated = |kind, rate| {
            let mut r = test_row(kind, Run::Saturated, Pace::FlatOut, rate, None);
            r.connections = 256;
            rows.push(r);
        };
        saturated(RowKind::Baseline, 70_000);
        saturated(RowKind::Ingest, 42_000);
        // The yardstick stays the mean of the table's runs.
        assert_eq!(baseline_rate(&rows), Some(80_000.0));
        assert_eq!(
            ingest_line(&rows),
            "| durable ingest ≥ 50% of baseline req/s | 38% (30,000 vs 80,000 req/s, the mean of the baseline \
             before and after ingest: 96,000 and 64,000). Saturated, C=256: 60% (42,000 vs 70,000 req/s); each \
             at its best: 44% (42,000 vs 96,000 req/s) | **not met** |"
        );
        let table = table(&rows);
        assert!(
            table.contains("| ingest saturated | flat out, C=256 | 42,000 | 42,000 |"),
            "{table}"
        );
        // Each saturated row against the saturated baseline.
        assert!(table.contains("| 0.60 |") && table.contains("| 1.00 |"), "{table}");
    }

    #[test]
    fn stalls_read_as_a_count_and_the_longest() {
        let mut s = crate::proc::Stalls::default();
        assert_eq!(stalls(&s), "no stalls, host steal 0.00 cores");
        s.count = 1;
        s.longest = Duration::from_millis(143);
        s.steal_cores = 0.034;
        assert_eq!(stalls(&s), "1 stall of 143 ms, host steal 0.03 cores");
        s.count = 3;
        assert_eq!(stalls(&s), "3 stalls (longest 143 ms), host steal 0.03 cores");
        let mut rows = rows(&[(Run::Max, 96_000)], 40_000);
        assert!(!table(&rows).contains("stood still"));
        rows[1].stalls = s;
        assert!(
            table(&rows).contains(
                "The machine stood still (a bench thread asleep 1 ms at a time woke 20 ms or more late): \
                 ingest 3 stalls (longest 143 ms), host steal 0.03 cores."
            ),
            "{}",
            table(&rows)
        );
    }

    #[test]
    fn open_loop_baseline_runs_are_not_a_yardstick() {
        let mut rows = rows(&[(Run::Max, 96_000)], 40_000);
        rows.push(test_row(
            RowKind::Baseline,
            Run::Half,
            Pace::Rate(20_000.0),
            20_000,
            None,
        ));
        assert_eq!(baseline_rate(&rows), Some(96_000.0));
    }
}
