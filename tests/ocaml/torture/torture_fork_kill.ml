(* Kill torture with plain Unix.fork and the Shmpool API. One pool for the
   whole run; each trial forks [nworkers] workers running the stamped
   alloc/free loop (1-100 pages), SIGKILLs one of them at a random moment,
   lets the others finish under a deadline, runs a fresh worker, then
   checks the pool: sound, nothing but the victim's blocks left, and after
   reclaim_dead every page free in one run. *)

open Torture

let suite = "fork-kill"
let nworkers = 3
let pool_pages = 1536
let survivor_ops = 1500
let trials = 40 * scale
let deadline = 20.0

let run () =
  let rng = Random.State.make [| seed |] in
  let pool = Shmpool.create (pool_pages * ps) in
  let api = shmpool_api pool in
  let mb = mailbox ((nworkers + 1) * slot_words) in
  let kills = ref 0 and deadlocks = ref 0 and violations = ref 0 and lost = ref 0 in
  let ooms = ref 0 and ops = ref 0 and reclaimed = ref 0 in
  let violation fmt =
    Printf.ksprintf
      (fun s ->
        if !violations = 0 then prerr_endline ("torture " ^ suite ^ ": " ^ s);
        incr violations)
      fmt
  in
  let t0 = now () in
  for trial = 1 to trials do
    Bigarray.Array1.fill mb 0L;
    let start i ops =
      let s = Random.State.bits rng in
      spawn (fun () ->
          churn api mb (i * slot_words) ~rng:(Random.State.make [| s |]) ~ops
            ~tag:(Int64.of_int ((trial lsl 4) lor i));
          0)
    in
    let victim = Random.State.int rng nworkers in
    let pids = Array.init nworkers (fun i -> start i (if i = victim then max_int else survivor_ops)) in
    let vbase = victim * slot_words in
    let tv = now () in
    while get mb (vbase + w_progress) = 0 && now () -. tv < deadline do sleep 0.0002 done;
    sleep (Random.State.float rng 0.004);
    kill pids.(victim) Sys.sigkill;
    (match wait_for ~secs:deadline pids.(victim) with
     | Signaled s when s = Sys.sigkill -> incr kills
     | Timeout -> incr deadlocks; kill_and_reap pids.(victim)
     | _ -> violation "trial %d: the victim ended on its own" trial);
    let finish what pid =
      match wait_for ~secs:deadline pid with
      | Exited 0 -> ()
      | Timeout ->
          incr deadlocks;
          prerr_endline (Printf.sprintf "torture %s: trial %d: %s hung (killed)" suite trial what);
          diagnose pid;
          kill_and_reap pid
      | Exited c -> violation "trial %d: %s exited %d" trial what c
      | Signaled s -> violation "trial %d: %s killed by signal %d" trial what s
    in
    Array.iteri (fun i pid -> if i <> victim then finish "a survivor" pid) pids;
    finish "the fresh worker" (start nworkers survivor_ops);
    for i = 0 to nworkers do
      let b = i * slot_words in
      violations := !violations + get mb (b + w_violations);
      ooms := !ooms + get mb (b + w_ooms);
      ops := !ops + get mb (b + w_progress);
      if i <> victim && get mb (b + w_status) <> 1 then violation "trial %d: worker %d did not finish" trial i
    done;
    (match Shmpool.check pool with
     | [] -> ()
     | l ->
         violation "trial %d: check: %s" trial (String.concat "; " l);
         prerr_endline
           (Printf.sprintf "torture %s: trial %d: victim %d (pid %d), pids [%s], OOMs %s, recoveries %d, owners [%s], check again: [%s]"
              suite trial victim pids.(victim)
              (String.concat ";" (Array.to_list (Array.map string_of_int pids)))
              (String.concat ";" (List.init (nworkers + 1) (fun i -> string_of_int (get mb ((i * slot_words) + w_ooms)))))
              (Shmpool.stats pool).recoveries
              (String.concat "; "
                 (List.map
                    (fun (o : Shmpool.owner) -> Printf.sprintf "%d%s %dp %db" o.pid (if o.alive then "" else " dead") o.pages o.blocks)
                    (Shmpool.owners pool)))
              (String.concat "; " (Shmpool.check pool))));
    let r = Shmpool.reclaim_dead pool in
    reclaimed := !reclaimed + r.pages_freed;
    List.iter
      (fun (pid, pages) ->
        if pages > 0 && pid <> pids.(victim) then violation "trial %d: dead process %d still held %d pages" trial pid pages)
      r.dead;
    let s = Shmpool.stats pool in
    if s.free <> s.payload || s.live_blocks <> 0 || s.largest_free <> s.payload then begin
      let l = (s.payload - s.free) / ps in
      lost := !lost + max l 1;
      prerr_endline
        (Printf.sprintf "torture %s: trial %d: %d pages not free, %d live blocks, largest run %d of %d\n%s" suite trial l
           s.live_blocks s.largest_free s.payload (Shmpool.debug_info pool));
      (* go on from a clean pool *)
      ignore (Shmpool.reclaim_dead pool)
    end;
    match Shmpool.check pool with [] -> () | l -> violation "trial %d: check at the end: %s" trial (String.concat "; " l)
  done;
  let s = Shmpool.stats pool in
  report ~suite "%d trials, %d kills, %d deadlocks, %d violations, %d pages lost (%d recoveries, %d pages reclaimed, %d ops, %d OOMs, %.1f s, seed %d)"
    trials !kills !deadlocks !violations !lost s.recoveries !reclaimed !ops !ooms (now () -. t0) seed;
  Shmpool.close pool;
  !kills = trials && !deadlocks = 0 && !violations = 0 && !lost = 0

let () = main ~suite run
