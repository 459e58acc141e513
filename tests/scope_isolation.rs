//! The in-house client example under load: concurrent tasks with different `scope`s, on a
//! multi-thread runtime, never see each other's deps; bypassed tasks store nothing.

use std::collections::BTreeSet;
use std::sync::Arc;

use cachecore::Invalidation;
use cachecore::{scope, CachecoreLayer, Dep, MemoryStore, RequestContext, POLICY_DEP};

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/inhouse_client.rs"]
mod inhouse_client;

use inhouse_client::{openai_standin, LlmClient};

const TASKS: usize = 96;
/// Calls each task makes inside its scope (a miss, then hits), with yields in between so tasks
/// interleave and move between worker threads.
const CALLS_PER_TASK: usize = 3;

/// What task `i` declares: its own doc, sometimes a shared table, sometimes nothing, and every
/// fourth task bypasses.
fn context_of(i: usize) -> RequestContext {
    match i % 4 {
        0 => RequestContext::new().dep(Dep::new(format!("doc:{i}"))),
        1 => RequestContext::new()
            .dep(Dep::new(format!("doc:{i}")).hash(format!("v{i}")))
            .dep(Dep::new(format!("table:t{}", i % 3))),
        2 => RequestContext::new(),
        _ => RequestContext::bypass_all(),
    }
}

fn prompt_of(i: usize) -> String {
    format!("task-{i}: summarise your inputs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_scopes_never_see_each_others_deps() {
    let server = openai_standin::start().await.unwrap();
    let store = MemoryStore::new();
    let layer = CachecoreLayer::builder().store(store.clone()).build();
    let llm = Arc::new(LlmClient::new(&server.chat_url(), "m", &layer).unwrap());

    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let llm = Arc::clone(&llm);
            tokio::spawn(scope(context_of(i), async move {
                let mut answers = Vec::new();
                for _ in 0..CALLS_PER_TASK {
                    answers.push(llm.complete(&prompt_of(i)).await.unwrap());
                    tokio::task::yield_now().await;
                }
                answers
            }))
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let answers = task.await.unwrap();
        let expected = openai_standin::answer_to("m", &prompt_of(i));
        assert!(
            answers.iter().all(|a| *a == expected),
            "task {i} got {answers:?}"
        );
    }

    let entries = store.entries();
    for i in 0..TASKS {
        let marker = format!("task-{i}:");
        let mine: Vec<_> = entries
            .iter()
            .filter(|(_, e)| String::from_utf8_lossy(&e.body).contains(&marker))
            .collect();
        let ctx = context_of(i);
        if ctx.is_bypass() {
            assert!(mine.is_empty(), "bypassed task {i} stored an entry");
            continue;
        }
        assert_eq!(mine.len(), 1, "task {i} must have exactly one entry");
        let recorded: BTreeSet<String> = store.deps_of(&mine[0].0).unwrap().into_iter().collect();
        let mut declared: BTreeSet<String> = ctx.deps().iter().map(|d| d.id().to_owned()).collect();
        declared.insert(POLICY_DEP.to_owned());
        assert_eq!(
            recorded, declared,
            "task {i}'s entry carries another scope's deps"
        );
    }
    let cached_tasks = (0..TASKS).filter(|i| !context_of(*i).is_bypass()).count();
    let bypassed_tasks = TASKS - cached_tasks;
    assert_eq!(store.entry_count(), cached_tasks as u64);
    // One upstream call per cached task, every call of a bypassed task.
    assert_eq!(
        server.calls(),
        cached_tasks + bypassed_tasks * CALLS_PER_TASK
    );

    // And the deps work: invalidating one task's doc drops exactly that task's entry.
    let before = store.entry_count();
    let result = layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:5"]))
        .await
        .unwrap();
    assert_eq!(result.deps()[0].deleted, 1);
    assert_eq!(store.entry_count(), before - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_spawned_inside_a_scope_does_not_inherit_it() {
    let server = openai_standin::start().await.unwrap();
    let store = MemoryStore::new();
    let layer = CachecoreLayer::builder().store(store.clone()).build();
    let llm = LlmClient::new(&server.chat_url(), "m", &layer).unwrap();

    scope(RequestContext::bypass_all(), async {
        // Spawned: outside the bypass scope, so this one is cached.
        let spawned = llm.clone();
        tokio::spawn(async move { spawned.complete("spawned").await.unwrap() })
            .await
            .unwrap();
        // In the scope: not stored.
        llm.complete("in scope").await.unwrap();
    })
    .await;
    let bodies: Vec<String> = store
        .entries()
        .iter()
        .map(|(_, e)| String::from_utf8_lossy(&e.body).into_owned())
        .collect();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert!(bodies[0].contains("spawned"));
}
