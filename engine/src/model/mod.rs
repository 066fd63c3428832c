//! The bottom layer of the runbook model: names, selectors and value positions that the
//! runbook, the inventory, templates and expressions all use, depending on nothing else in
//! the engine but `source`.

mod located;
mod selector;
mod step_id;

pub use located::Located;
pub use selector::{Pattern, Selector, Slice, Term, TermOp};
pub use step_id::StepId;
