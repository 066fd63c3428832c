//! Graph compile: the steps' `needs` become a petgraph DAG. Unknown needs and cycles are
//! diagnostics (a cycle prints its path); the result knows its topological order and levels.

use std::collections::HashMap;
use std::fmt::Write as _;

use petgraph::algo::kosaraju_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::diagnostic::{suggest, Code, Diagnostic, Diagnostics};
use crate::runbook::Runbook;

/// How many unknown-need diagnostics get a "did you mean" (each costs a pass over all ids).
const MAX_SUGGESTIONS: usize = 50;

/// Index of a step in `Runbook::steps` (and node index in the graph: they are the same).
pub type StepIdx = usize;

#[derive(Debug, Clone)]
pub struct StepGraph {
    /// Edges point from a step to the steps that need it (execution order).
    graph: DiGraph<StepIdx, ()>,
    /// Steps grouped by depth: level 0 needs nothing, level n needs something at n-1.
    levels: Vec<Vec<StepIdx>>,
}

impl StepGraph {
    pub fn compile(runbook: &Runbook) -> Result<Self, Diagnostics> {
        let mut diags = Diagnostics::default();
        let mut graph = DiGraph::with_capacity(runbook.steps.len(), runbook.steps.len());
        let mut index: HashMap<&str, NodeIndex> = HashMap::with_capacity(runbook.steps.len());
        for (i, step) in runbook.steps.iter().enumerate() {
            index.insert(step.id.as_str(), graph.add_node(i));
        }
        for (i, step) in runbook.steps.iter().enumerate() {
            for need in &step.needs {
                match index.get(need.id.as_str()) {
                    Some(&from) => {
                        graph.update_edge(from, NodeIndex::new(i), ());
                    }
                    None => {
                        let mut d = Diagnostic::error(
                            Code::UnknownNeed,
                            format!(
                                "step `{}` needs `{}`, which does not exist",
                                step.id, need.id
                            ),
                        )
                        .at(
                            &runbook.source,
                            need.span.clone(),
                            "no step has this id",
                        );
                        // Suggestions compare against every id: keep a generated runbook with
                        // thousands of bad needs from taking seconds to report them.
                        let near = (diags.0.len() < MAX_SUGGESTIONS)
                            .then(|| {
                                suggest(
                                    need.id.as_str(),
                                    runbook.steps.iter().map(|s| s.id.as_str()),
                                )
                            })
                            .flatten();
                        if let Some(near) = near {
                            d = d.help(format!("did you mean `{near}`?"));
                        }
                        diags.push(d);
                    }
                }
            }
        }
        for cycle in cycles(&graph) {
            // Report each cycle once, at the `needs` entry of its first step that closes it.
            let ids: Vec<&str> = cycle
                .iter()
                .map(|&i| runbook.steps[i].id.as_str())
                .collect();
            let first = &runbook.steps[cycle[0]];
            let next = runbook.steps[cycle[1 % cycle.len()]].id.as_str();
            let span = first
                .needs
                .iter()
                .find(|n| n.id.as_str() == next)
                .map_or(first.id_span.clone(), |n| n.span.clone());
            let mut path = ids.join(" → ");
            let _ = write!(path, " → {}", ids[0]);
            let mut d = Diagnostic::error(Code::Cycle, format!("dependency cycle: {path}"))
                .at(
                    &runbook.source,
                    span,
                    format!("`{}` needs `{next}`", first.id),
                )
                .note("each arrow points from a step to a step it needs");
            for pair in cycle.iter().skip(1).zip(cycle.iter().cycle().skip(2)) {
                let (a, b) = (&runbook.steps[*pair.0], &runbook.steps[*pair.1]);
                if let Some(n) = a.needs.iter().find(|n| n.id == b.id) {
                    d = d.also(
                        &runbook.source,
                        n.span.clone(),
                        format!("`{}` needs `{}`", a.id, b.id),
                    );
                }
            }
            diags.push(d.help("remove one of these `needs` entries"));
        }
        if !diags.has_errors() {
            check_step_refs(runbook, &graph, &index, &mut diags);
            check_run_refs(runbook, &index, &mut diags);
        }
        if diags.has_errors() {
            diags.sort();
            return Err(diags);
        }
        let levels = levels(&graph);
        Ok(Self { graph, levels })
    }

    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    pub fn levels(&self) -> &[Vec<StepIdx>] {
        &self.levels
    }

    /// Steps this step needs.
    pub fn needs(&self, step: StepIdx) -> impl Iterator<Item = StepIdx> + '_ {
        self.graph
            .neighbors_directed(NodeIndex::new(step), Direction::Incoming)
            .map(NodeIndex::index)
    }

    /// Steps that need this step.
    pub fn dependents(&self, step: StepIdx) -> impl Iterator<Item = StepIdx> + '_ {
        self.graph
            .neighbors_directed(NodeIndex::new(step), Direction::Outgoing)
            .map(NodeIndex::index)
    }

    /// Every step that transitively needs `step`, including itself.
    pub fn descendants(&self, step: StepIdx) -> Vec<bool> {
        let mut seen = vec![false; self.len()];
        let mut stack = vec![step];
        while let Some(s) = stack.pop() {
            if !std::mem::replace(&mut seen[s], true) {
                stack.extend(self.dependents(s));
            }
        }
        seen
    }

    pub fn to_text(&self, runbook: &Runbook) -> String {
        let mut out = String::new();
        for (n, level) in self.levels.iter().enumerate() {
            let _ = writeln!(out, "level {n}:");
            for &i in level {
                let step = &runbook.steps[i];
                let needs: Vec<&str> = step.needs.iter().map(|n| n.id.as_str()).collect();
                if needs.is_empty() {
                    let _ = writeln!(out, "  {}", step.id);
                } else {
                    let _ = writeln!(out, "  {} ← {}", step.id, needs.join(", "));
                }
            }
        }
        out
    }

    pub fn to_dot(&self, runbook: &Runbook) -> String {
        let mut out = format!(
            "digraph {} {{\n  rankdir=LR;\n  node [shape=box];\n",
            quote(&runbook.meta.name)
        );
        for step in &runbook.steps {
            let mut attrs = String::new();
            if step.always {
                attrs.push_str(", style=dashed");
            }
            let label = match &step.phase {
                Some(p) => format!("{}\\n({p})", step.id),
                None => step.id.to_string(),
            };
            let _ = writeln!(
                out,
                "  {} [label={}{attrs}];",
                quote(step.id.as_str()),
                quote(&label)
            );
        }
        for step in &runbook.steps {
            for need in &step.needs {
                let _ = writeln!(
                    out,
                    "  {} -> {};",
                    quote(need.id.as_str()),
                    quote(step.id.as_str())
                );
            }
        }
        out.push_str("}\n");
        out
    }

    pub fn to_mermaid(&self, runbook: &Runbook) -> String {
        // Mermaid node ids must be simple; use the step index and show the id as the label.
        let mut out = String::from("flowchart LR\n");
        for (i, step) in runbook.steps.iter().enumerate() {
            let _ = writeln!(out, "  s{i}[\"{}\"]", step.id);
        }
        let pos: HashMap<&str, usize> = runbook
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        for (i, step) in runbook.steps.iter().enumerate() {
            for need in &step.needs {
                if let Some(from) = pos.get(need.id.as_str()) {
                    let _ = writeln!(out, "  s{from} --> s{i}");
                }
            }
        }
        out
    }
}

/// Run-level expressions (hooks, the drill's `restored_data_time`) may read any step, but only
/// one that exists: a typo would otherwise surface after the whole run, as an unmeasured drill.
fn check_run_refs(runbook: &Runbook, index: &HashMap<&str, NodeIndex>, diags: &mut Diagnostics) {
    let h = &runbook.hooks;
    let exprs = [
        &h.before_run,
        &h.after_run,
        &h.before_step,
        &h.after_step,
        &h.on_failure,
    ]
    .into_iter()
    .flatten()
    .chain(
        runbook
            .drill
            .as_ref()
            .and_then(|d| d.restored_data_time.as_ref()),
    );
    for e in exprs {
        for r in crate::analyzer::refs_in(&e.expr.text, 0, &e.at) {
            if index.contains_key(r.id.as_str()) {
                continue;
            }
            let mut d = Diagnostic::error(
                Code::UnknownStepRef,
                format!("`steps.{}` refers to no step", r.id),
            )
            .at(&runbook.source, r.span.clone(), "no step has this id");
            if let Some(near) = suggest(r.id.as_str(), runbook.steps.iter().map(|s| s.id.as_str()))
            {
                d = d.help(format!("did you mean `{near}`?"));
            }
            diags.push(d);
        }
    }
}

/// Expressions may read `steps.ID` only for steps that exist and are guaranteed to have
/// finished first (ancestors through `needs`).
fn check_step_refs(
    runbook: &Runbook,
    graph: &DiGraph<StepIdx, ()>,
    index: &HashMap<&str, NodeIndex>,
    diags: &mut Diagnostics,
) {
    for (i, step) in runbook.steps.iter().enumerate() {
        if step.refs.is_empty() {
            continue;
        }
        let mut ancestors = vec![false; graph.node_count()];
        let mut stack = vec![NodeIndex::new(i)];
        while let Some(n) = stack.pop() {
            for p in graph.neighbors_directed(n, Direction::Incoming) {
                if !std::mem::replace(&mut ancestors[p.index()], true) {
                    stack.push(p);
                }
            }
        }
        for r in &step.refs {
            match index.get(r.id.as_str()) {
                None => {
                    let mut d = Diagnostic::error(
                        Code::UnknownStepRef,
                        format!("`steps.{}` refers to no step", r.id),
                    )
                    .at(&runbook.source, r.span.clone(), "no step has this id");
                    let prefixed = runbook.steps.iter().find(|s| {
                        s.id.as_str().starts_with(r.id.as_str())
                            && s.id.as_str()[r.id.as_str().len()..].starts_with(['-', '.'])
                    });
                    if let Some(s) = prefixed {
                        d = d.help(format!(
                            "ids with `-` or `.` are written `steps[\"{}\"]`",
                            s.id
                        ));
                    } else if let Some(near) =
                        suggest(r.id.as_str(), runbook.steps.iter().map(|s| s.id.as_str()))
                    {
                        d = d.help(format!("did you mean `{near}`?"));
                    }
                    diags.push(d);
                }
                Some(n) if n.index() == i => {}
                Some(n) if !ancestors[n.index()] => {
                    let d = Diagnostic::error(
                        Code::UnorderedStepRef,
                        format!(
                            "step `{}` reads `steps.{}` but does not need it",
                            step.id, r.id
                        ),
                    )
                    .at(&runbook.source, r.span.clone(), "may not have run yet")
                    .help(format!(
                        "add `\"{}\"` to the `needs` of `{}`",
                        r.id, step.id
                    ));
                    diags.push(d);
                }
                Some(_) => {}
            }
        }
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Each cycle as a path of step indices (in `needs` direction), one per strongly connected
/// component that has one.
fn cycles(graph: &DiGraph<StepIdx, ()>) -> Vec<Vec<StepIdx>> {
    let mut out = Vec::new();
    // Kosaraju, not Tarjan: petgraph's Tarjan recurses once per node and overflows the stack on
    // a 100,000-step chain.
    for scc in kosaraju_scc(graph) {
        let start = *scc.iter().min().unwrap_or(&scc[0]);
        if scc.len() == 1 && !graph.contains_edge(start, start) {
            continue;
        }
        let members: std::collections::HashSet<NodeIndex> = scc.iter().copied().collect();
        let in_scc = |n: NodeIndex| members.contains(&n);
        // Walk `needs` edges (incoming) inside the component until we come back to `start`.
        let mut path = vec![start];
        let mut visited: std::collections::HashSet<NodeIndex> = std::iter::once(start).collect();
        let mut current = start;
        loop {
            let next = graph
                .neighbors_directed(current, Direction::Incoming)
                .filter(|n| in_scc(*n))
                .min_by_key(|n| (*n != start, visited.contains(n), n.index()));
            match next {
                Some(n) if n == start => break,
                Some(n) if !visited.contains(&n) => {
                    visited.insert(n);
                    path.push(n);
                    current = n;
                }
                // Revisiting a node means the shortest way back is through it: cut the path there.
                Some(n) => {
                    let cut = path.iter().position(|p| *p == n).unwrap_or(0);
                    path.drain(..cut);
                    break;
                }
                None => break,
            }
        }
        out.push(path.into_iter().map(|n| graph[n]).collect());
    }
    out.sort();
    out
}

fn levels(graph: &DiGraph<StepIdx, ()>) -> Vec<Vec<StepIdx>> {
    let n = graph.node_count();
    let mut indegree: Vec<usize> = (0..n)
        .map(|i| {
            graph
                .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
                .count()
        })
        .collect();
    let mut level: Vec<usize> = vec![0; n];
    let mut queue: std::collections::VecDeque<usize> =
        (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut levels: Vec<Vec<StepIdx>> = Vec::new();
    while let Some(i) = queue.pop_front() {
        if levels.len() <= level[i] {
            levels.resize_with(level[i] + 1, Vec::new);
        }
        levels[level[i]].push(i);
        for d in graph.neighbors_directed(NodeIndex::new(i), Direction::Outgoing) {
            let d = d.index();
            level[d] = level[d].max(level[i] + 1);
            indegree[d] -= 1;
            if indegree[d] == 0 {
                queue.push_back(d);
            }
        }
    }
    for l in &mut levels {
        l.sort_unstable();
    }
    levels
}
