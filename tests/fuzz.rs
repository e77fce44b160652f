//! Every fuzz target runs briefly from its seeds and nothing may panic: a crash's input is
//! written to target/fuzz-crashes/ and named here. `cargo bench --bench fuzz` runs them longer.

#[test]
fn no_fuzz_target_crashes_in_a_short_run() {
    let dir = std::path::Path::new("target/fuzz-crashes");
    let mut crashes = Vec::new();
    for t in segadapt::fuzz::TARGETS {
        let o = segadapt::fuzz::run(t, std::time::Duration::from_millis(1500), 1, dir).unwrap();
        assert!(
            o.executions > 20,
            "{}: only {} executions",
            t.name,
            o.executions
        );
        assert!(o.errors > 0, "{}: mutations never reached an error", t.name);
        eprintln!(
            "{}: {} executions, {} distinct errors, corpus {}",
            t.name, o.executions, o.errors, o.corpus
        );
        crashes.extend(o.crashes);
    }
    assert!(crashes.is_empty(), "crashing inputs: {crashes:?}");
}
