//! Turning trials into figures: the median of the interleaved runs with min–max, the
//! ratio to the ideal consumer, the tables on the terminal and the JSON document.
//!
//! Guarantee: every figure printed is the median of the runs that measured it, shown
//! with its min–max whenever there was more than one run; a figure that could not be
//! measured is shown as `—`, never as 0.

use comfy_table::presets::ASCII_MARKDOWN;
use comfy_table::Table;
use serde::Serialize;

use super::matrix::{ContenderKind, Scenario};
use super::trial::TrialResult;

/// Median with min and max over runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figure {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Figure {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: values[0],
            max: values[n - 1],
            runs: n,
        })
    }

    fn show(&self) -> String {
        if self.runs > 1 {
            format!(
                "{} ({}–{})",
                number(self.median),
                number(self.min),
                number(self.max)
            )
        } else {
            number(self.median)
        }
    }
}

fn show(figure: &Option<Figure>) -> String {
    figure
        .as_ref()
        .map_or_else(|| "—".to_string(), Figure::show)
}

/// Thousands separated above 100, three significant digits below.
fn number(value: f64) -> String {
    if value.abs() >= 100.0 {
        let digits = format!("{:.0}", value.abs());
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if value < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CpuFigures {
    pub contender: Option<Figure>,
    pub mariadbd: Option<Figure>,
    pub kafka: Option<Figure>,
    pub redis: Option<Figure>,
}

/// One row: a contender on a scenario, over all runs.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: Scenario,
    pub contender: ContenderKind,
    pub messages_per_second: Option<Figure>,
    pub ratio_to_ideal: Option<Figure>,
    pub latency_p50_ms: Option<Figure>,
    pub latency_p99_ms: Option<Figure>,
    pub latency_max_ms: Option<Figure>,
    pub peak_rss_mib: Option<Figure>,
    pub cpu_seconds_per_1k_messages: CpuFigures,
    pub delay_records_per_record: Option<Figure>,
    pub unlocked_writes_per_record: Option<Figure>,
    /// `exact`, what went wrong in each run that was not, or `n/a` (writes nothing).
    pub correctness: String,
}

/// Fills each trial's ratio to the ideal consumer of its run and scenario.
pub fn fill_ratios(trials: &mut [TrialResult]) {
    let ideal: Vec<(usize, Scenario, f64)> = trials
        .iter()
        .filter(|t| t.contender == ContenderKind::Ideal)
        .map(|t| (t.run, t.scenario, t.messages_per_second))
        .collect();
    for trial in trials.iter_mut() {
        trial.ratio_to_ideal = ideal
            .iter()
            .find(|(run, scenario, _)| *run == trial.run && *scenario == trial.scenario)
            .map(|(_, _, rate)| trial.messages_per_second / rate.max(1e-9));
    }
}

/// One summary per (scenario, contender), in the order they first appear.
pub fn summarize(trials: &[TrialResult]) -> Vec<Summary> {
    let mut keys: Vec<(Scenario, ContenderKind)> = Vec::new();
    for t in trials {
        if !keys.contains(&(t.scenario, t.contender)) {
            keys.push((t.scenario, t.contender));
        }
    }
    keys.into_iter()
        .map(|(scenario, contender)| {
            let runs: Vec<&TrialResult> = trials
                .iter()
                .filter(|t| t.scenario == scenario && t.contender == contender)
                .collect();
            let of = |f: &dyn Fn(&TrialResult) -> Option<f64>| {
                Figure::of(runs.iter().filter_map(|t| f(t)))
            };
            Summary {
                scenario,
                contender,
                messages_per_second: of(&|t| Some(t.messages_per_second)),
                ratio_to_ideal: of(&|t| t.ratio_to_ideal),
                latency_p50_ms: of(&|t| t.latency.as_ref().map(|l| l.p50_ms)),
                latency_p99_ms: of(&|t| t.latency.as_ref().map(|l| l.p99_ms)),
                latency_max_ms: of(&|t| t.latency.as_ref().map(|l| l.max_ms)),
                peak_rss_mib: of(&|t| t.peak_rss_bytes.map(|b| b as f64 / 1_048_576.0)),
                cpu_seconds_per_1k_messages: CpuFigures {
                    contender: of(&|t| t.cpu_seconds_per_1k_messages.contender),
                    mariadbd: of(&|t| t.cpu_seconds_per_1k_messages.mariadbd),
                    kafka: of(&|t| t.cpu_seconds_per_1k_messages.kafka),
                    redis: of(&|t| t.cpu_seconds_per_1k_messages.redis),
                },
                delay_records_per_record: of(&|t| t.delay_records_per_record),
                unlocked_writes_per_record: of(&|t| t.unlocked_writes_per_record),
                correctness: correctness(&runs),
            }
        })
        .collect()
}

fn correctness(runs: &[&TrialResult]) -> String {
    let checked: Vec<_> = runs
        .iter()
        .filter_map(|t| t.correctness.as_ref().map(|c| (t.run, c)))
        .collect();
    if checked.is_empty() {
        return "n/a".to_string();
    }
    if checked.iter().all(|(_, c)| c.is_exact()) {
        return "exact".to_string();
    }
    // Compact for the table: how many runs were off, and the worst of them (the JSON
    // has every run's check).
    let wrong: Vec<_> = checked.iter().filter(|(_, c)| !c.is_exact()).collect();
    let (run, worst) = wrong
        .iter()
        .max_by_key(|(_, c)| c.lost + c.duplicate_messages + c.altered + c.dead_lettered)
        .expect("some run is not exact");
    format!(
        "{} of {} runs off; worst (run {run}): {}",
        wrong.len(),
        checked.len(),
        worst.summary()
    )
}

/// The throughput table: rate, ratio, latency, correctness.
pub fn throughput_table(summaries: &[Summary]) -> String {
    let mut table = Table::new();
    table.load_style(ASCII_MARKDOWN).set_header(vec![
        "scenario",
        "contender",
        "msg/s",
        "× ideal",
        "latency p50 / p99 / max (ms)",
        "correctness",
    ]);
    for s in summaries {
        let latency = match (&s.latency_p50_ms, &s.latency_p99_ms, &s.latency_max_ms) {
            (Some(a), Some(b), Some(c)) => format!("{} / {} / {}", a.show(), b.show(), c.show()),
            _ => "—".to_string(),
        };
        table.add_row(vec![
            s.scenario.label().to_string(),
            s.contender.label().to_string(),
            show(&s.messages_per_second),
            show(&s.ratio_to_ideal),
            latency,
            s.correctness.clone(),
        ]);
    }
    table.to_string()
}

/// The cost table: memory, CPU per 1,000 messages per process, delay and unlocked
/// traffic.
pub fn cost_table(summaries: &[Summary]) -> String {
    let mut table = Table::new();
    table.load_style(ASCII_MARKDOWN).set_header(vec![
        "scenario",
        "contender",
        "peak RSS (MiB)",
        "CPU-s / 1k msgs: contender",
        "mariadbd",
        "kafka",
        "redis",
        "delay rec / rec",
        "unlocked writes / rec",
    ]);
    for s in summaries {
        let cpu = &s.cpu_seconds_per_1k_messages;
        table.add_row(vec![
            s.scenario.label().to_string(),
            s.contender.label().to_string(),
            show(&s.peak_rss_mib),
            show(&cpu.contender),
            show(&cpu.mariadbd),
            show(&cpu.kafka),
            show(&cpu.redis),
            show(&s.delay_records_per_record),
            show(&s.unlocked_writes_per_record),
        ]);
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_is_the_median_with_its_range() {
        let f = Figure::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((f.median, f.min, f.max, f.runs), (2.0, 1.0, 3.0, 3));
        assert_eq!(Figure::of([1.0, 4.0]).unwrap().median, 2.5);
        assert_eq!(Figure::of([]), None);
        assert_eq!(f.show(), "2.00 (1.00–3.00)");
        assert_eq!(Figure::of([43_210.4]).unwrap().show(), "43,210");
        assert_eq!(show(&None), "—");
    }
}
