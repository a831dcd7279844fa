// The book's layout at run time. scripts/book_site.py adds this file to every page;
// tests/browser checks what it does.
(() => {
  // A table too wide for the screen (on a phone) is shown row by row, each cell under the
  // heading of its column, instead of scrolling sideways (book_layout.css draws the rows).
  const stackWideTables = () => {
    document.querySelectorAll("article table").forEach((table) => {
      table.classList.remove("stacked");
      const box = table.parentElement;
      if (box.scrollWidth <= box.clientWidth + 1) return;
      const headings = Array.from(table.querySelectorAll("thead th"), (th) => th.textContent.trim());
      table.querySelectorAll("tbody tr").forEach((row) => {
        Array.from(row.children).forEach((cell, i) => {
          if (headings[i]) cell.dataset.label = headings[i];
        });
      });
      table.classList.add("stacked");
    });
  };
  // Measure once the equations are typeset: MathJax changes the widths of the cells.
  window.addEventListener("load", () => {
    const typeset = window.MathJax && MathJax.startup && MathJax.startup.promise;
    (typeset || Promise.resolve()).then(stackWideTables, stackWideTables);
  });
  window.addEventListener("resize", stackWideTables);

  // A printed chapter shows its hidden code (the solutions to the exercises) open, as
  // sphinx-togglebutton does for the prose solutions; the page closes them again afterwards.
  window.addEventListener("beforeprint", () => {
    document.querySelectorAll("article details:not([open])").forEach((details) => {
      details.open = true;
      details.dataset.openedForPrint = "true";
    });
  });
  window.addEventListener("afterprint", () => {
    document.querySelectorAll("article details[data-opened-for-print]").forEach((details) => {
      details.open = false;
      delete details.dataset.openedForPrint;
    });
  });
})();
