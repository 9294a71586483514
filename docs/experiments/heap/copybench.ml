external init : unit -> unit = "cp_init"
external add : 'a -> 'a = "cp_add" [@@noalloc]
external lock_unlock : unit -> unit = "cp_lock_unlock" [@@noalloc]
let time name n f =
  let t = Unix.gettimeofday () in
  for i = 1 to n do f i done;
  let dt = Unix.gettimeofday () -. t in
  Printf.printf "%-40s %7.1f ns/op  %6.2f M/s\n%!" name (dt *. 1e9 /. float n) (float n /. dt /. 1e6)
let () =
  init ();
  let l10 = List.init 10 Fun.id in
  let c = add l10 in
  assert (c = l10 && c != l10);
  let rec cyc = 1 :: 2 :: cyc in
  let cc = add cyc in assert (List.tl (List.tl cc) == cc);
  let shared = let x = [1] in (x, x) in let s = add shared in assert (fst s == snd s);
  let f = Sys.opaque_identity (fun x -> x + 1) in
  assert ((Obj.magic (add f) : int) = -1);
  let n = 2_000_000 in
  time "robust lock+unlock" n (fun _ -> lock_unlock ());
  time "add 10-element int list (lock inside)" n (fun _ -> ignore (add l10));
  let r = ref [] in
  time "add + store into a private ref" n (fun _ -> r := add l10);
  let s = String.make 10_000 'a' in
  time "add 10 KB string" (n / 10) (fun _ -> ignore (add s));
  let big = List.init 1000 (fun i -> (i, string_of_int i)) in
  time "add 1000-element (int*string) list" (n / 100) (fun _ -> ignore (add big))
