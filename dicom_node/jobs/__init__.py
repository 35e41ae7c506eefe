"""Jobs: the lease table, the job function (analyse and write), the queue backends behind one
interface."""
