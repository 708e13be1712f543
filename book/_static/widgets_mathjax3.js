// The ipywidgets HTML manager typesets widget labels through the MathJax 2 API
// (MathJax.Hub.Queue(["Typeset", MathJax.Hub, element])); the book loads MathJax 3.
// Loaded (deferred) after MathJax on every page: route those calls to MathJax 3.
(function () {
  if (!window.MathJax || window.MathJax.Hub || !window.MathJax.startup) {
    return;   // no MathJax on this page, or a MathJax 2 that has its own Hub
  }
  window.MathJax.Hub = {
    Queue: function (job) {
      var element = Array.isArray(job) ? job[2] : undefined;
      window.MathJax.startup.promise.then(function () {
        return element ? window.MathJax.typesetPromise([element]) : window.MathJax.typesetPromise();
      });
    },
  };
})();
